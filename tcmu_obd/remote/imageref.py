"""Image references and manifests: parsing `host[:port]/repo[:tag|@digest]`
the docker/containerd way, fetching an image manifest (picking a platform
from an index), and turning an overlaybd image's manifest into the
config.v1.json the snapshotter would write (docs/runtime.md, Device config from a manifest).

It also builds a RegistryClient from the global config.  It does not open
layers or images (tcmu_obd.image.assemble does) and holds no HTTP logic of its own
(tcmu_obd.remote.registry)."""
import json
import logging
import os
import re
from urllib.parse import urlsplit

from tcmu_obd.core import fileio
from tcmu_obd.remote import distribution, registry
from tcmu_obd.remote.credentials import CredentialProvider
from tcmu_obd.errors import ManifestError, UsageError

log = logging.getLogger(__name__)


def client_from_service_config(svc, cred_file=""):
    """A RegistryClient with the credentials, timeouts and TLS settings of a
    ServiceConfig; `cred_file` (a cred.json) replaces its credential source."""
    if cred_file:
        if not os.path.isfile(cred_file):
            raise UsageError(f"credential file {cred_file}: no such file")
        creds = CredentialProvider(mode="file", path=cred_file)
    else:
        cred = svc.effective_credential
        creds = CredentialProvider(cred.mode, cred.path, cred.timeout, cred.client_cert_path,
                                   cred.client_key_path, cred.server_ca_path,
                                   svc.credential_file_path)
    own = svc.tcmu_obd
    settings = registry.RegistrySettings(
        timeout=own.registry_timeout_sec, retries=own.registry_retries,
        read_deadline=own.read_deadline_sec, user_agent=svc.user_agent,
        cert_file=svc.cert_config.cert_file, key_file=svc.cert_config.key_file,
        p2p_address=svc.p2p_config.address if svc.p2p_config.enable else "")
    return registry.RegistryClient(settings, creds)


_PATH_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_REPO = re.compile(rf"^{_PATH_COMPONENT}(?:/{_PATH_COMPONENT})*$")
_TAG = re.compile(r"^[\w][\w.-]{0,127}$")
DIGEST_RE = re.compile(r"^sha256:[0-9a-f]{64}$")         # a sha256 digest, as manifests and configs carry it
_LOCAL_HOSTS = ("localhost", "127.0.0.1", "::1")
_DOCKER_HUB = ("docker.io", "index.docker.io", "registry-1.docker.io")
A_PREFIX = "containerd.io/snapshot/overlaybd/"
A_BLOB_DIGEST = A_PREFIX + "blob-digest"
A_BLOB_SIZE = A_PREFIX + "blob-size"
A_ACCEL = A_PREFIX + "acceleration-layer"
A_TURBO = (A_PREFIX + "turbo-oci/target-digest", A_PREFIX + "fastoci/target-digest")
INDEX_TYPES = ("application/vnd.oci.image.index.v1+json",
               "application/vnd.docker.distribution.manifest.list.v2+json")


class RepoRef:
    """A registry repository (scheme, host, repo) and an optional tag or digest."""

    def __init__(self, scheme, host, repo, ref=None):
        self.scheme, self.host, self.repo, self.ref = scheme, host, repo, ref

    @property
    def base(self):
        """<scheme>://<host>/v2/<repo>"""
        return f"{self.scheme}://{self.host}/v2/{self.repo}"

    @property
    def repo_blob_url(self):
        return self.base + "/blobs"

    def __str__(self):
        sep = "@" if self.ref and self.ref.startswith("sha256:") else ":"
        return f"{self.host}/{self.repo}{sep + self.ref if self.ref else ''}"


def _hostname(host):
    h = host.rpartition("@")[2]
    if h.startswith("["):
        return h[1:h.find("]")]
    return h.rsplit(":", 1)[0] if h.count(":") == 1 else h


def _registry_host(host):
    """The snapshotter's docker.io -> registry-1.docker.io."""
    return "registry-1.docker.io" if host in _DOCKER_HUB else host


def parse_ref(text, plain_http=False, with_ref=True):
    """`http(s)://host[:port]/v2/<repo>[/manifests/<ref>]` or a reference
    `[host[:port]/]repo[:tag][@sha256:...]` -> RepoRef.  A reference's first
    component is a host when it has a '.' or ':' or is localhost (as docker
    reads references); none means Docker Hub.  Plain references use HTTP for
    localhost, 127.0.0.1 and ::1 and HTTPS otherwise; plain_http forces HTTP."""
    text = text.strip()
    ref = None
    if "://" in text:
        parts = urlsplit(text)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise UsageError(f"{text!r}: expected an http(s) URL or a reference HOST/REPO[:TAG]")
        path = parts.path.strip("/")
        if not path.startswith("v2/"):
            raise UsageError(f"{text!r}: a registry URL must be http(s)://HOST/v2/REPO")
        repo = path[3:]
        for tail in ("/blobs/uploads", "/blobs"):
            if repo.endswith(tail):
                repo = repo[: -len(tail)]
        if "/manifests/" in repo:
            repo, _, ref = repo.partition("/manifests/")
        scheme = "http" if plain_http else parts.scheme
        host = _registry_host(parts.netloc)
    else:
        name = text
        if "@" in name:
            name, _, ref = name.partition("@")
        slash, colon = name.rfind("/"), name.rfind(":")
        if colon > slash:
            name, tag = name[:colon], name[colon + 1:]
            ref = ref or tag
        first, sep, rest = name.partition("/")
        if sep and ("." in first or ":" in first or first == "localhost"):
            host, repo = first, rest
        else:
            host, repo = "docker.io", name if "/" in name else "library/" + name
        local = _hostname(host) in _LOCAL_HOSTS
        scheme = "http" if plain_http or local else "https"
        host = _registry_host(host)
    if not _REPO.match(repo or ""):
        raise UsageError(f"{text!r}: {repo!r} is not a valid repository name "
                         f"(lowercase letters, digits, separators . _ __ -, and /)")
    if ref is not None and not (DIGEST_RE.match(ref) or (not ref.startswith("sha256:")
                                                       and _TAG.match(ref))):
        raise UsageError(f"{text!r}: {ref!r} is neither a tag nor a sha256:<64 hex> digest")
    if with_ref:
        ref = ref or "latest"
    elif ref:
        raise UsageError(f"{text!r}: expected a repository, not a tag or digest")
    return RepoRef(scheme, host, repo, ref)


def parse_platform(text):
    parts = text.split("/")
    if len(parts) not in (2, 3) or not all(parts):
        raise UsageError(f"--platform {text!r}: expected OS/ARCH or OS/ARCH/VARIANT")
    return parts


def _json_doc(manifest, where):
    try:
        doc = json.loads(manifest.content)
    except (ValueError, UnicodeDecodeError) as e:
        raise ManifestError(f"{where}: the manifest is not JSON: {e}") from None
    if not isinstance(doc, dict):
        raise ManifestError(f"{where}: the manifest is not a JSON object")
    return doc


def fetch_image_manifest(client, ref, platform):
    """The image manifest (a dict) for ref; an index / manifest list is
    resolved to the entry for `platform` ([os, arch] or [os, arch, variant])."""
    target = ref.ref
    for _depth in range(4):
        where = f"{ref.host}/{ref.repo}{'@' if target.startswith('sha256:') else ':'}{target}"
        m = distribution.get_manifest(client, f"{ref.base}/manifests/{target}")
        doc = _json_doc(m, where)
        media_type = m.media_type or doc.get("mediaType", "")
        if media_type not in INDEX_TYPES and not (not media_type and "manifests" in doc):
            if not isinstance(doc.get("layers"), list):
                raise ManifestError(f"{where}: not an image manifest (media type "
                                  f"{media_type or 'unknown'!r}, no layers)")
            return doc, where
        entries = [d for d in doc.get("manifests") or [] if isinstance(d, dict)]
        pick = None
        for d in entries:
            p = d.get("platform") or {}
            if p.get("os") == platform[0] and p.get("architecture") == platform[1] and \
                    (len(platform) < 3 or p.get("variant") == platform[2]):
                pick = d
                break
        if pick is None:
            have = sorted({"/".join(filter(None, [(d.get("platform") or {}).get(k) for k in
                                                  ("os", "architecture", "variant")]))
                           for d in entries} - {""})
            raise UsageError(f"{where}: the index has no manifest for {'/'.join(platform)} "
                             f"(it has: {', '.join(have) or 'no platforms'}); use --platform")
        target = pick.get("digest", "")
        if not DIGEST_RE.match(target):
            raise ManifestError(f"{where}: index entry digest {target!r} is not sha256:<64 hex>")
    raise ManifestError(f"{ref}: indexes nested more than 3 deep")


def overlaybd_lowers(manifest, where, dir_root=""):
    """config.v1.json lowers for an overlaybd image manifest, bottom to top,
    from the layers' overlaybd annotations (docs/formats.md, Image manifests and annotations).  The
    acceleration (trace) layer is left out.  Every other layer must carry
    the blob-digest annotation: a plain OCI layer is not guessed at."""
    lowers, plain, turbo = [], [], []
    for i, layer in enumerate(manifest["layers"]):
        if not isinstance(layer, dict):
            raise ManifestError(f"{where}: layers[{i}] is not an object")
        ann = layer.get("annotations") or {}
        if not isinstance(ann, dict):
            raise ManifestError(f"{where}: layers[{i}].annotations is not an object")
        if ann.get(A_ACCEL) == "yes":
            log.warning(f"{where}: layers[{i}] is an acceleration (trace) layer; it is left "
                        f"out (the snapshotter unpacks it locally)")
            continue
        if any(ann.get(k) for k in A_TURBO):
            turbo.append(i)
            continue
        digest = ann.get(A_BLOB_DIGEST)
        if not digest:
            plain.append(f"layers[{i}] {layer.get('digest', '?')}")
            continue
        if not DIGEST_RE.match(digest):
            raise ManifestError(f"{where}: layers[{i}] {A_BLOB_DIGEST} = {digest!r}: "
                              f"not sha256:<64 hex>")
        size_text = ann.get(A_BLOB_SIZE)
        if size_text is None:
            size = layer.get("size")
        elif isinstance(size_text, str) and size_text.isdigit():
            size = int(size_text)
        else:
            size = None
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise ManifestError(f"{where}: layers[{i}] {A_BLOB_SIZE} = {size_text!r}: "
                              f"not a decimal size")
        if layer.get("digest") and layer["digest"] != digest:
            log.warning(f"{where}: layers[{i}] descriptor digest {layer['digest']} differs "
                        f"from its {A_BLOB_DIGEST} {digest}; using the annotation")
        lower = {"digest": digest, "size": size}
        if dir_root:
            lower["dir"] = os.path.join(dir_root, digest.split(":", 1)[1])
        lowers.append(lower)
    if turbo:
        raise UsageError(f"{where}: layers {turbo} are TurboOCI layers; image-config handles "
                         f"only native overlaybd images")
    if plain:
        raise UsageError(f"{where}: not an overlaybd image: {len(plain)} of "
                         f"{len(manifest['layers'])} layers have no {A_BLOB_DIGEST} annotation "
                         f"({'; '.join(plain[:4])}{'; ...' if len(plain) > 4 else ''}). "
                         f"image-config needs the overlaybd annotations on every layer; it does "
                         f"not guess from the blobs")
    if not lowers:
        raise UsageError(f"{where}: the image has no overlaybd layers")
    if len(lowers) > 255:
        raise UsageError(f"{where}: {len(lowers)} layers; overlaybd uses at most 255")
    return lowers


def go_json(obj):
    """Compact JSON as Go's encoding/json writes it (HTML-safe escapes)."""
    text = json.dumps(obj, separators=(",", ":"), ensure_ascii=False)
    for ch, esc in (("<", "\\u003c"), (">", "\\u003e"), ("&", "\\u0026"),
                    ("\u2028", "\\u2028"), ("\u2029", "\\u2029")):
        text = text.replace(ch, esc)
    return text


def write_atomic(path, data, mode=0o600):
    """Write data to path atomically, mode 0600 (as the snapshotter writes
    config.v1.json)."""
    fileio.write_atomic(path, data, mode, prefix=".config-")


