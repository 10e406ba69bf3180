#!/usr/bin/env bash
# Install dbsync on a Debian/Ubuntu (or any systemd) machine, from this checkout.
#
#   sudo packaging/install.sh                  install, or upgrade in place
#   sudo packaging/install.sh --uninstall      remove; keeps /etc/dbsync and /var/lib/dbsync
#   packaging/install.sh --root DIR            lay the same files out under DIR (tests,
#                                              packagers): no root needed, systemd untouched
#   --wheel FILE                               install this wheel instead of building one
#
# What goes where (the units name these paths; keep them in step):
#   /opt/dbsync/                      a virtual environment: requirements/run.txt, hashes
#                                     checked, then the dbsync wheel with --no-deps
#   /usr/bin/dbsync                   a link to /opt/dbsync/bin/dbsync (ExecStart= runs it)
#   /usr/lib/systemd/system/          dbsync.service, dbsync@.service (local changes go in
#                                     drop-ins, `systemctl edit dbsync`, which upgrades keep)
#   /usr/lib/sysusers.d/dbsync.conf   the system user and group dbsync
#   /usr/lib/tmpfiles.d/dbsync.conf   /etc/credstore.encrypted, where the token goes
#   /etc/dbsync/config.toml           the example configuration, only if there is none
#   /usr/share/doc/dbsync/            README, monitoring guide, reference and example configs
#
# Needs python3 >= 3.11 with venv support (Debian/Ubuntu: apt-get install python3-venv).
# It never starts or enables the service; it prints the next steps instead.
set -euo pipefail

prog=${0##*/}
source_dir=$(cd "$(dirname "$0")/.." && pwd)
python=${PYTHON:-python3}
root=""
wheel=""
action=install

die() {
    printf '%s: %s\n' "$prog" "$*" >&2
    exit 1
}
say() { printf '%s\n' "$*"; }

usage() {
    sed -n '2,8s/^# \{0,1\}//p' "$0"
}

while (($#)); do
    case $1 in
    --root)
        (($# >= 2)) || die "--root needs a directory"
        root=$2
        shift 2
        ;;
    --root=*)
        root=${1#--root=}
        shift
        ;;
    --wheel)
        (($# >= 2)) || die "--wheel needs a file"
        wheel=$2
        shift 2
        ;;
    --wheel=*)
        wheel=${1#--wheel=}
        shift
        ;;
    --uninstall)
        action=uninstall
        shift
        ;;
    -h | --help)
        usage
        exit 0
        ;;
    *)
        usage >&2
        die "unknown argument: $1"
        ;;
    esac
done

if [[ -n $root ]]; then
    [[ -d $root ]] || die "--root $root: no such directory"
    root=$(cd "$root" && pwd)
    [[ $root != / ]] || root=""
elif ((EUID != 0)); then
    die "run as root (sudo $0), or lay the files out under a directory with --root DIR"
fi

# The paths on the target system; "$root" prefixes each one when writing.
venv=/opt/dbsync
link=/usr/bin/dbsync
unit_dir=/usr/lib/systemd/system
units=(dbsync.service dbsync@.service)
sysusers=/usr/lib/sysusers.d/dbsync.conf
tmpfiles=/usr/lib/tmpfiles.d/dbsync.conf
config_dir=/etc/dbsync
config=$config_dir/config.toml
doc_dir=/usr/share/doc/dbsync
state_dir=/var/lib/dbsync

# Only a real install talks to systemd; --root leaves the running system alone.
live() { [[ -z $root ]]; }
# systemd runs this machine (sd_booted(3)); in a container or an image build it does not,
# and there is no manager to reload or to stop units with.
booted() { live && [[ -d /run/systemd/system ]]; }

uninstall() {
    if live && command -v systemctl >/dev/null; then
        # The units go away: stop and disable what runs or is enabled from them first,
        # the template's instances too.
        local -a names
        mapfile -t names < <(
            {
                echo dbsync.service
                find /etc/systemd/system -path '*.wants/dbsync*.service' -printf '%f\n'
                if booted; then
                    systemctl list-units --all --plain --no-legend \
                        'dbsync.service' 'dbsync@*.service' | awk '{print $1}'
                fi
            } 2>/dev/null | sort -u
        )
        say "stopping and disabling: ${names[*]}"
        if booted; then
            systemctl disable --now "${names[@]}" || true
        else
            systemctl disable "${names[@]}" || true
        fi
    fi
    if [[ -L $root$link && $(readlink "$root$link") == *opt/dbsync/bin/dbsync ]]; then
        rm -f "$root$link"
    fi
    rm -rf "$root$venv" "$root$venv".new "$root$venv".old "$root$doc_dir"
    for unit in "${units[@]}"; do
        rm -f "$root$unit_dir/$unit"
    done
    rm -f "$root$sysusers" "$root$tmpfiles"
    if booted; then
        systemctl daemon-reload
    fi
    say "dbsync is uninstalled."
    say "Kept: the configuration in $root$config_dir, the state in $root$state_dir,"
    say "the credentials in $root/etc/credstore.encrypted and the user and group dbsync."
    say "Remove them by hand if they are no longer wanted."
}

if [[ $action == uninstall ]]; then
    uninstall
    exit 0
fi

# Refuse before changing anything: the interpreter, venv support, the files to install.
command -v "$python" >/dev/null || die "$python not found: install python3 (>= 3.11)"
"$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))' ||
    die "dbsync needs Python >= 3.11; $python is $("$python" -V 2>&1)"
# Debian and Ubuntu split venv support off: `import venv` works, ensurepip does not.
"$python" -c 'import ensurepip, venv' 2>/dev/null ||
    die "$python cannot create a virtual environment: apt-get install python3-venv"
for file in requirements/run.txt systemd/dbsync.service systemd/dbsync@.service \
    systemd/dbsync.sysusers.conf systemd/config.example.toml README.md; do
    [[ -f $source_dir/$file ]] || die "$source_dir/$file is missing: run from a dbsync checkout"
done
if [[ -n $wheel ]]; then
    [[ -f $wheel ]] || die "--wheel $wheel: no such file"
    wheel=$(cd "$(dirname "$wheel")" && pwd)/$(basename "$wheel")
fi

work=$(mktemp -d)
stage=$root$venv.new
cleanup() {
    rm -rf "$work"
    # A failed build leaves the installed venv as it was and no half-built one beside it.
    [[ ! -e $stage ]] || rm -rf "$stage"
}
trap cleanup EXIT

# 1. The new virtual environment, built beside the installed one: a failure at any step
#    leaves the installed dbsync untouched.
say "building $root$venv from $source_dir"
mkdir -p "$(dirname "$stage")"
rm -rf "$stage"
"$python" -m venv "$stage"
# The daemon runs as an unprivileged user: an interpreter only root may run (one under
# /root, say) would install fine and fail at the first start.
# (Through sh, as the entry point runs it: setpriv's own exec can still reach it.)
# shellcheck disable=SC2016 # $0 is for the inner sh
if live && ! setpriv --reuid=65534 --regid=65534 --clear-groups \
    /bin/sh -c 'exec "$0" -c ""' "$stage/bin/python3" 2>/dev/null; then
    die "$python ($("$python" -c 'import sys; print(sys.executable)')) cannot be run by" \
        "other users, so not by the service either: run with PYTHON=/usr/bin/python3"
fi
pip=("$stage/bin/python" -m pip --quiet --disable-pip-version-check --no-input)
# The exact versions CI proved, hashes checked (hatchling, in the lock, builds the wheel).
"${pip[@]}" install --require-hashes -r "$source_dir/requirements/run.txt"
if [[ -z $wheel ]]; then
    # No build isolation: the locked hatchling builds it, nothing unpinned is fetched.
    "${pip[@]}" wheel --no-deps --no-build-isolation --wheel-dir "$work" "$source_dir"
    wheel=$(echo "$work"/dbsync-*.whl)
    [[ -f $wheel ]] || die "building the dbsync wheel made no dbsync-*.whl"
fi
"${pip[@]}" install --no-deps "$wheel"

# 2. Make it run from $venv, where it is swapped to. The entry point finds its
#    interpreter beside itself (through the /usr/bin link too), so that the venv also
#    runs where --root laid it out; the other scripts name $venv.
cat >"$stage/bin/dbsync" <<'EOF'
#!/bin/sh
'''exec' "$(dirname -- "$(readlink -f -- "$0")")/python3" "$0" "$@"
' '''
# dbsync's entry point, written by packaging/install.sh: a shell line that runs this
# file with the interpreter beside it, wherever the virtual environment sits.
import sys

from dbsync.cli import main

if __name__ == "__main__":
    sys.exit(main())
EOF
chmod 0755 "$stage/bin/dbsync"
for script in "$stage"/bin/* "$stage/pyvenv.cfg"; do
    [[ -f $script && ! -L $script && $script != "$stage/bin/dbsync" ]] || continue
    sed -i "s|$stage|$venv|g" "$script"
done
"$stage/bin/dbsync" --version >/dev/null || die "the new $stage/bin/dbsync does not run"

# 3. Swap: two renames, the old venv kept until the new one is in place.
if [[ -e $root$venv ]]; then
    rm -rf "$root$venv.old"
    mv "$root$venv" "$root$venv.old"
fi
mv "$stage" "$root$venv"
rm -rf "$root$venv.old"

# 4. The command on PATH, relative so that it also resolves under --root.
mkdir -p "$root$(dirname "$link")"
ln -sfn "../../opt/dbsync/bin/dbsync" "$root$link"

# 5. systemd: units, user, directories.
install -d -m 0755 "$root$unit_dir" "$root$(dirname "$sysusers")" "$root$(dirname "$tmpfiles")"
for unit in "${units[@]}"; do
    install -m 0644 "$source_dir/systemd/$unit" "$root$unit_dir/$unit"
    if live && [[ -e /etc/systemd/system/$unit ]]; then
        say "warning: /etc/systemd/system/$unit overrides $unit_dir/$unit; remove it" \
            "(local changes belong in a drop-in: systemctl edit ${unit%.service})" >&2
    fi
done
install -m 0644 "$source_dir/systemd/dbsync.sysusers.conf" "$root$sysusers"
cat >"$root$tmpfiles" <<'EOF'
# /usr/lib/tmpfiles.d/dbsync.conf: where `systemd-creds encrypt` puts dbsync's
# Demandbase token, and where LoadCredentialEncrypted= looks for it. Only root reads it.
d /etc/credstore.encrypted 0700 root root -
EOF
chmod 0644 "$root$tmpfiles"
if live; then
    systemd-sysusers "$sysusers"
    systemd-tmpfiles --create "$tmpfiles"
fi

# 6. The configuration: the example only when there is none, never over an operator's.
install -d -m 0755 "$root$config_dir"
if [[ -e $root$config ]]; then
    say "kept $root$config (the example is in $root$doc_dir/config.example.toml)"
else
    install -m 0640 "$source_dir/systemd/config.example.toml" "$root$config"
    # The daemon runs as dbsync and reads it; it holds no secret, but is nobody else's.
    if live; then chgrp dbsync "$root$config"; fi
    say "installed the example configuration $root$config: edit it"
fi

# 7. The documentation the units' Documentation= names.
rm -rf "$root$doc_dir"
install -d -m 0755 "$root$doc_dir"
install -m 0644 "$source_dir/README.md" "$root$doc_dir/README.md"
install -m 0644 "$source_dir/systemd/config.example.toml" "$root$doc_dir/config.example.toml"
[[ ! -f $source_dir/config.toml ]] ||
    install -m 0644 "$source_dir/config.toml" "$root$doc_dir/config.reference.toml"
[[ ! -f $source_dir/docs/monitoring.md ]] ||
    install -m 0644 "$source_dir/docs/monitoring.md" "$root$doc_dir/monitoring.md"

version=$("$root$venv/bin/dbsync" --version)
if ! live; then
    say "$version laid out under $root"
    exit 0
fi
say "$version is installed in $venv."
if ! booted; then
    say "systemd does not run here: the units take effect when it does."
    exit 0
fi
systemctl daemon-reload
if systemctl is-active --quiet dbsync.service; then
    say "dbsync.service still runs the previous version: systemctl restart dbsync"
else
    cat <<EOF
Next steps (README.md, "Install on a VM"):
  1. edit $config (every key: $doc_dir/config.reference.toml)
  2. the Demandbase token, encrypted for this machine:
       systemd-creds encrypt --name=demandbase-token - /etc/credstore.encrypted/demandbase-token
  3. sudo -u dbsync dbsync check-config
  4. probe the tenant's contract, as the service would run:
       systemd-run --pipe --wait --collect -p User=dbsync -p StateDirectory=dbsync \\
         -p LoadCredentialEncrypted=demandbase-token dbsync probe --config $config --yes
  5. systemctl enable --now dbsync && dbsync ctl status
EOF
fi
