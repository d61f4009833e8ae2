"""The remote room: the registry (HTTP client, credentials, image references,
blob transfers), the local blob cache and the trace prefetch.  It hands the
image room cached blobs; it does not open layers or images (tcmu_obd.image)
and knows nothing of the kernel or the tools above it."""
