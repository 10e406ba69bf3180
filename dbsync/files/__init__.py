"""AEP account-audience file exports: the watched folder and what it reads.

AEP activates account audiences to LinkedIn, its own Demandbase destination and to
file-based cloud storage only (its HTTP API destination does not carry them), so a
real AEP customer feeds dbsync through a daily file export into a folder dbsync can
read: an SFTP chroot on the VM, or a bucket the operator's sync tool mirrors.

=========  ===============================================================
names      which audience, run and part a file name says (the documented
           templates, split parts, the folder macro)
manifest   AEP's optional manifest: the parts of a run and their sizes
formats    containers, encodings, CSV options, JSON Lines, Parquet; columns
           and rows, with rows left out counted
watcher    the service: polls the folder, waits for a run to be complete,
           applies it through the store, cleans up after ``keep_days``
=========  ===============================================================
"""
