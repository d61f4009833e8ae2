"""Remote lowers: the registry client, credentials and file cache that a
device's layers share, built from the global config, and opening one lower's
blob through the cache (nothing is fetched yet).

It wires tcmu_obd.remote.registry, tcmu_obd.remote.credentials and
tcmu_obd.remote.cache together; it holds no HTTP, cache or format logic of
its own, and does not open layers: tcmu_obd.image.assemble reads the blob's
headers and index (tcmu_obd.image.layer.open_cached_layer).
"""
from tcmu_obd.remote import registry
from tcmu_obd.remote.cache import FileCache
from tcmu_obd.remote.imageref import client_from_service_config
from tcmu_obd.errors import ConfigError


class RemoteContext:
    """What every remote layer of a daemon (or a tool run) shares."""

    def __init__(self, service_cfg):
        self.cfg = service_cfg
        cache_cfg = service_cfg.effective_cache
        if cache_cfg.cache_type not in ("file", "download", "ocf"):
            raise ConfigError(f"cacheConfig.cacheType = {cache_cfg.cache_type!r}: not supported")
        # ocf and download caches are served with file-cache semantics (documented choice)
        self.cache = FileCache(cache_cfg.cache_dir, cache_cfg.cache_size_gb, cache_cfg.refill_size)
        self.client = client_from_service_config(service_cfg)

    def open_blob(self, repo_blob_url, lower, where, key="digest"):
        """lowers[i]'s blob from the registry through the cache: (cache.CachedBlob, url).
        `where` names the lower in messages; `key` is the lower's digest key
        (`targetDigest` for a TurboOCI lower's target, whose size only the
        registry knows)."""
        digest = lower.get(key, "")
        if not repo_blob_url:
            raise ConfigError(f"{where}: empty repoBlobUrl")
        if not digest.startswith("sha256:") or len(digest) != 71:
            raise ConfigError(f"{where}.{key} = {digest!r}: expected sha256:<64 hex digits>")
        url = registry.blob_url(repo_blob_url, digest)
        blob = self.client.open_blob(url)
        size = blob.size
        if key == "digest" and lower.get("size") and lower["size"] != size:
            raise ConfigError(f"{where}.size = {lower['size']}: the registry says {url} has {size} bytes")
        return self.cache.open(digest, size, blob), url

    def close(self):
        self.client.close()

