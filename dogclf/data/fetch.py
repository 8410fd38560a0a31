"""`dogclf data fetch`: grow the class folders from the public dog.ceo API, like the shared photos were made.

Every new image is decoded in full, turned upright (EXIF), converted to RGB, shrunk to at most 512 px on its longer
side and saved as a baseline JPEG, quality 90, 4:2:0, optimised Huffman tables (what the shared files are), named by
the SHA-1 of the new bytes. Exact duplicates (SHA-1 of the downloaded or re-encoded bytes) and near-duplicates (pHash
within `min_distance` bits of any image of any class, including those fetched earlier in the run) are rejected.
Files are written to a temporary name and renamed; each kept image then gets a MANIFEST.csv row with its source URL;
rejected URLs go to `.fetch-state.json` beside the manifest. A re-run downloads neither again, so an interrupted run
loses nothing; delete the state file to try the rejected URLs again.
"""

from __future__ import annotations

import csv
import email.utils
import hashlib
import http.client
import io
import json
import os
import re
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from dogclf.config import ConfigError
from dogclf.data.index import DataError, image_files

DEFAULT_API = "https://dog.ceo/api"
DEFAULT_BREEDS = {"bichon_frise": "frise/bichon", "maltese": "maltese", "samoyed": "samoyed", "spitz": "spitz/japanese"}
MAX_SIDE = 512  # longer side of a stored image, as in the shared set (never upscaled)
JPEG_QUALITY = 90
# Shorter side under which a photo is rejected: every shared photo has at least 136 px, and at a 224 px model input the
# eval resize (256 px) would blow a smaller one up more than 2x.
MIN_SIDE = 128
# pHash bits an image must differ by from every other one. Re-encodes and resizes of a photo land at 0-2 bits, a 15 %
# brighter copy at <= 6; the 741k pairs of distinct shared photos at >= 10 (one pair at 10, then 12+), so `< 10`
# catches copies while passing every pair the shared set already holds. pHashes split 32/32, so distances are even.
MIN_DISTANCE = 10
MANIFEST = "MANIFEST.csv"
STATE = ".fetch-state.json"
FIELDS = ["file", "breed", "source_repo", "source_commit", "source_path", "width", "height", "phash"]
SOURCE_REPO = "dog.ceo"
USER_AGENT = "dogclf/0.1 (white-dog photo fetcher; python urllib)"
MAX_RETRY_AFTER = 120.0  # seconds: a longer Retry-After is cut to this
IMAGENET_ID = re.compile(r"n\d{8}_\d+")  # dog.ceo serves Stanford Dogs / ImageNet photos under their ImageNet names
REJECTIONS = ("corrupt", "too_small", "duplicate", "near_duplicate", "failed")
COLUMNS = ("listed", "had", "skipped", "new", *REJECTIONS, "left", "total")


# --- perceptual hash ------------------------------------------------------------------------------------------------

_N = 32
_DCT = np.cos(np.pi * np.outer(np.arange(_N), 2 * np.arange(_N) + 1) / (2 * _N))  # DCT-II basis (scale irrelevant)


def phash(im: Image.Image) -> str:
    """imagehash.phash as 16 hex digits: grey 32x32 (LANCZOS), 2-D DCT, top-left 8x8 > its median, row-major bits."""
    pixels = np.asarray(im.convert("L").resize((_N, _N), Image.Resampling.LANCZOS), dtype=np.float64)
    low = (_DCT @ pixels @ _DCT.T)[:8, :8]
    return np.packbits(low > np.median(low)).tobytes().hex()


def distance(a: str, b: str) -> int:
    """Hamming distance of two hex pHashes."""
    return (int(a, 16) ^ int(b, 16)).bit_count()


# --- HTTP: rate limit, retries ---------------------------------------------------------------------------------------


class RateLimiter:
    """`wait()` returns no sooner than 1/rate seconds after the previous return."""

    def __init__(self, rate: float, clock: Callable[[], float] = time.monotonic, sleep=time.sleep):
        self.interval, self.clock, self.sleep, self.next = 1.0 / rate, clock, sleep, float("-inf")

    def wait(self) -> None:
        now = self.clock()
        if now < self.next:
            self.sleep(self.next - now)
            now = self.next
        self.next = now + self.interval


class NetworkError(Exception):
    """The server could not be reached (or kept dropping the connection) through all retries."""

    def __init__(self, url: str, detail: str):
        super().__init__(detail)
        self.host = urllib.parse.urlsplit(url).netloc


class Http:
    """GET with a User-Agent, a rate limit, and retries with exponential backoff on network errors, 429 and 5xx."""

    def __init__(self, rate: float, retries: int, timeout: float, backoff: float, sleep=time.sleep):
        self.limiter = RateLimiter(rate, sleep=sleep)
        self.retries, self.timeout, self.backoff, self.sleep = retries, timeout, backoff, sleep

    def get(self, url: str) -> bytes:
        """The body; raises urllib.error.HTTPError for an error status (after retries) and NetworkError."""
        request = urllib.request.Request(url, headers={"User-Agent": USER_AGENT})
        for attempt in range(self.retries + 1):
            last = attempt == self.retries
            self.limiter.wait()
            try:
                with urllib.request.urlopen(request, timeout=self.timeout) as response:
                    return response.read()
            except urllib.error.HTTPError as err:
                if last or (err.code != 429 and err.code < 500):
                    raise
                wait = retry_after(err.headers.get("Retry-After"))
                err.close()
            except (OSError, http.client.HTTPException) as err:  # refused, reset, timeout, truncated body
                if last:
                    reason = getattr(err, "reason", None) or err
                    raise NetworkError(url, f"{type(reason).__name__}: {reason}".rstrip(": ")) from err
                wait = None
            self.sleep(self.backoff * 2**attempt if wait is None else wait)
        raise AssertionError("unreachable")


def retry_after(value: str | None) -> float | None:
    """Seconds from a Retry-After header (delay or HTTP date), capped; None when absent or unreadable."""
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        try:
            seconds = email.utils.parsedate_to_datetime(value).timestamp() - time.time()
        except (TypeError, ValueError):
            return None
    return min(max(seconds, 0.0), MAX_RETRY_AFTER)


# --- what the data root holds ----------------------------------------------------------------------------------------


@dataclass
class Known:
    """The data root's images by SHA-1 and pHash, its source URLs, and the URLs rejected by earlier runs."""

    root: Path
    sha1: dict[str, str] = field(default_factory=dict)  # sha1 -> file, relative to root
    phashes: dict[str, str] = field(default_factory=dict)  # file -> phash
    urls: set[str] = field(default_factory=set)
    imagenet_ids: set[str] = field(default_factory=set)
    unrecorded: set[str] = field(default_factory=set)  # image files on disk without a manifest row
    rejected: dict[str, str] = field(default_factory=dict)  # url -> reason

    @classmethod
    def load(cls, root: Path) -> Known:
        known = cls(root)
        for row in read_manifest(root / MANIFEST):
            known.add_row(row)
        for folder in (p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
            for path in image_files(folder):
                file = path.relative_to(root).as_posix()
                if file not in known.phashes:  # e.g. a crash between writing a file and its manifest row
                    data = path.read_bytes()
                    try:
                        with Image.open(io.BytesIO(data)) as im:
                            known.phashes[file] = phash(im)
                    except (OSError, SyntaxError, ValueError):
                        continue
                    known.sha1[hashlib.sha1(data).hexdigest()] = file
                    known.unrecorded.add(file)
        state = root / STATE
        if state.exists():
            try:
                known.rejected = dict(json.loads(state.read_text(encoding="utf-8"))["rejected"])
            except (ValueError, KeyError, TypeError) as err:
                raise DataError(f"{state} is not a fetch state file ({err}): delete it to start over") from None
        return known

    def add_row(self, row: dict[str, str]) -> None:
        file, url = row["file"], row["source_path"]
        self.sha1[Path(file).stem] = file
        self.phashes[file] = row["phash"]
        self.urls.add(url)
        if name := imagenet_id(url):
            self.imagenet_ids.add(name)

    def nearest(self, hash_: str, exclude: str = "") -> tuple[int, str]:
        """(distance, file) of the image closest in pHash, `exclude` aside; (65, '') when there is none."""
        return min(((distance(hash_, h), f) for f, h in self.phashes.items() if f != exclude), default=(65, ""))

    def reject(self, url: str, reason: str) -> None:
        self.rejected[url] = reason
        write_atomic(self.root / STATE, json.dumps({"rejected": self.rejected}, indent=1, sort_keys=True).encode())


def imagenet_id(url: str) -> str | None:
    """`n02085936_2889` for a path or URL ending in n02085936_2889.jpg (any extension), else None."""
    match = IMAGENET_ID.fullmatch(url.rsplit("/", 1)[-1].split(".", 1)[0])
    return match.group() if match else None


def read_manifest(path: Path) -> list[dict[str, str]]:
    if not path.exists():
        return []
    with path.open(newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        if reader.fieldnames != FIELDS:
            raise DataError(f"{path} has columns {reader.fieldnames}, expected {','.join(FIELDS)}: fix or move it")
        rows = list(reader)
    for number, row in enumerate(rows, start=2):
        if not re.fullmatch(r"[0-9a-f]{16}", row["phash"] or ""):
            raise DataError(f"{path} line {number}: phash {row['phash']!r} is not 16 hex digits: fix the row")
    return rows


def append_row(path: Path, row: dict[str, str]) -> None:
    """Append one manifest row (after the header, for a new file) and fsync it."""
    with path.open("ab+") as handle:  # every write goes to the end
        end = handle.seek(0, os.SEEK_END)
        handle.seek(max(end - 1, 0))
        text = io.StringIO()
        writer = csv.writer(text)  # \r\n line ends, as the shared manifest
        if end == 0:
            writer.writerow(FIELDS)
        elif handle.read(1) != b"\n":
            text.write("\r\n")
        writer.writerow([row[key] for key in FIELDS])
        handle.write(text.getvalue().encode("utf-8"))
        handle.flush()
        os.fsync(handle.fileno())


def write_atomic(path: Path, data: bytes) -> None:
    """Write to a hidden temporary file in the same folder, fsync, rename: `path` is never half-written."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# --- one image -------------------------------------------------------------------------------------------------------


class Rejected(Exception):
    """A downloaded image that is not kept: `kind` is one of REJECTIONS, the message says why."""

    def __init__(self, kind: str, reason: str):
        super().__init__(reason)
        self.kind = kind


def reencode(data: bytes, min_side: int = MIN_SIDE) -> bytes:
    """The image as the shared set stores it (upright RGB, longer side <= 512 px, JPEG q90); Rejected if unusable."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()  # decodes everything: a truncated file fails here
            im = ImageOps.exif_transpose(im).convert("RGB")
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise Rejected("corrupt", f"corrupt: {type(err).__name__}: {err}") from None
    if min(im.size) < min_side:
        raise Rejected("too_small", f"too small: {im.width}x{im.height} (shorter side < {min_side} px)")
    if max(im.size) > MAX_SIDE:
        scale = MAX_SIDE / max(im.size)
        im = im.resize((max(1, round(im.width * scale)), max(1, round(im.height * scale))), Image.Resampling.LANCZOS)
    out = io.BytesIO()
    im.save(out, "JPEG", quality=JPEG_QUALITY, optimize=True, subsampling="4:2:0", comment=b"")
    return out.getvalue()


def add_image(known: Known, cls: str, url: str, data: bytes, min_distance: int, min_side: int) -> bool:
    """Store one downloaded image in the class folder and the manifest, or raise Rejected; False: the file was there."""
    if (raw := hashlib.sha1(data).hexdigest()) in known.sha1:
        raise Rejected("duplicate", f"duplicate of {known.sha1[raw]}")
    encoded = reencode(data, min_side)
    sha1 = hashlib.sha1(encoded).hexdigest()
    file = f"{cls}/{sha1}.jpg"
    adopt = file in known.unrecorded  # written by a run that died before its manifest row: keep it, add the row
    if sha1 in known.sha1 and not adopt:
        raise Rejected("duplicate", f"duplicate of {known.sha1[sha1]}")
    with Image.open(io.BytesIO(encoded)) as im:
        hash_, width, height = phash(im), im.width, im.height
    near, other = known.nearest(hash_, exclude=file)
    if near < min_distance:
        raise Rejected("near_duplicate", f"near-duplicate of {other} (pHash distance {near})")
    if not adopt:
        write_atomic(known.root / file, encoded)
    values = [file, cls, SOURCE_REPO, "", url, str(width), str(height), hash_]  # source_commit: none at dog.ceo
    row = dict(zip(FIELDS, values, strict=True))
    append_row(known.root / MANIFEST, row)
    known.add_row(row)
    known.unrecorded.discard(file)
    return not adopt


# --- the command -----------------------------------------------------------------------------------------------------


def parse_breeds(items: Iterable[str]) -> dict[str, str]:
    """`CLASS=API_PATH` strings (e.g. `spitz=spitz/japanese`) as {class folder: dog.ceo breed path}."""
    breeds = {}
    for item in items:
        cls, sep, path = item.partition("=")
        cls, path = cls.strip(), path.strip().strip("/").lower()
        if not (sep and re.fullmatch(r"[A-Za-z0-9][\w-]*", cls) and re.fullmatch(r"[a-z0-9-]+(/[a-z0-9-]+)?", path)):
            raise ConfigError(
                f"--breed {item!r}: expected CLASS=BREED or CLASS=BREED/SUB-BREED, e.g. spitz=spitz/japanese"
            )
        breeds[cls] = path
    return breeds


def list_breed(http: Http, api: str, cls: str, path: str) -> list[str]:
    """The image URLs dog.ceo lists for breed `path`; unknown breeds and odd answers are DataErrors."""
    url = f"{api.rstrip('/')}/breed/{path}/images"
    try:
        body = http.get(url)
    except urllib.error.HTTPError as err:
        message = _json_message(err.read())
        if err.code == 404:
            raise DataError(f"dog.ceo has no breed {path!r} for class {cls} ({message or 'HTTP 404'}): "
                            f"fix it with --breed {cls}=BREED[/SUB-BREED]") from None
        raise DataError(f"{url} answered HTTP {err.code} {message or err.reason}: try again later") from None
    try:
        answer = json.loads(body)
        urls = answer["message"]
        assert answer.get("status") == "success" and all(isinstance(u, str) for u in urls)
    except (ValueError, KeyError, TypeError, AssertionError):
        raise DataError(f"{url} did not answer a dog.ceo image list: check --api") from None
    return list(urls)


def is_http(url: str) -> bool:
    try:
        parts = urllib.parse.urlsplit(url)
    except ValueError:
        return False
    return parts.scheme in ("http", "https") and bool(parts.hostname)


def _json_message(body: bytes) -> str:
    try:
        return str(json.loads(body).get("message", ""))
    except (ValueError, AttributeError):
        return ""


def check_root(root: Path, writable: bool) -> None:
    if not root.exists():
        raise DataError(f"data root {root} does not exist: pass --root DIR, the folder with one sub-folder per class")
    if not root.is_dir():
        raise DataError(f"data root {root} is not a folder: pass --root DIR, the folder with one sub-folder per class")
    if writable:
        try:
            tempfile.TemporaryFile(dir=root).close()
        except OSError as err:
            reason = err.strerror or err
            raise DataError(f"cannot write to data root {root} ({reason}): pass a writable --root") from None


def fetch(
    root: str | Path,
    breeds: dict[str, str] | None = None,
    *,
    api: str = DEFAULT_API,
    max_per_class: int | None = None,
    rate: float = 2.0,
    retries: int = 4,
    backoff: float = 1.0,
    timeout: float = 30.0,
    min_distance: int = MIN_DISTANCE,
    min_side: int = MIN_SIDE,
    dry_run: bool = False,
    out: Callable[[str], None] = print,
    sleep: Callable[[float], None] = time.sleep,
) -> dict[str, Counter]:
    """Fetch new images for every class in `breeds` ({class folder: dog.ceo breed path}); return the counts per class.

    Lists every breed first (an unknown one fails before anything is written), then downloads class by class until
    `max_per_class` images are in the folder. `dry_run` lists what would be downloaded and writes nothing.
    """
    breeds = parse_breeds(f"{cls}={path}" for cls, path in (DEFAULT_BREEDS if breeds is None else breeds).items())
    for name, value, ok in [
        ("--rate", rate, rate > 0),
        ("--retries", retries, retries >= 0),
        ("--backoff", backoff, backoff >= 0),
        ("--timeout", timeout, timeout > 0),
        ("--min-distance", min_distance, 0 <= min_distance <= 65),
        ("--min-side", min_side, min_side >= 1),
        ("--max-per-class", max_per_class, max_per_class is None or max_per_class >= 1),
    ]:
        if not ok:
            raise ConfigError(f"{name} {value} is out of range")
    if not is_http(api):
        raise ConfigError(f"--api {api!r} is not an http(s) URL")
    root = Path(root)
    check_root(root, writable=not dry_run)
    known = Known.load(root)
    http = Http(rate, retries, timeout, backoff, sleep)
    report: dict[str, Counter] = {cls: Counter() for cls in breeds}
    try:
        listings = {cls: list_breed(http, api, cls, path) for cls, path in breeds.items()}
        for cls, urls in listings.items():
            _fetch_class(http, known, cls, urls, report[cls], max_per_class, min_distance, min_side, dry_run, out)
    except NetworkError as err:
        if any(counts[k] for counts in report.values() for k in ("new", *REJECTIONS)):
            _print_report(report, out, dry_run)
        tries = f"{retries + 1} tries" if retries else "1 try"
        raise DataError(f"cannot reach {err.host} after {tries} ({err}): check the network or --api; "
                        "what was fetched is kept, run again to resume") from None
    except OSError as err:  # disk full, a read-only class folder, ...
        raise DataError(f"cannot write under data root {root} ({err}): fix it and run again to resume") from None
    _print_report(report, out, dry_run)
    return report


def _fetch_class(http: Http, known: Known, cls: str, urls: list[str], counts: Counter, max_per_class: int | None,
                 min_distance: int, min_side: int, dry_run: bool, out: Callable[[str], None]) -> None:
    folder = known.root / cls
    if not dry_run:
        folder.mkdir(exist_ok=True)
    counts["total"] = len(image_files(folder)) if folder.is_dir() else 0
    counts["listed"] = len(urls)
    out(f"{cls}: {len(urls)} images listed, {counts['total']} in {folder}")
    for url in urls:
        if url in known.urls or imagenet_id(url) in known.imagenet_ids:
            counts["had"] += 1
        elif url in known.rejected:
            counts["skipped"] += 1
        elif max_per_class is not None and counts["total"] >= max_per_class:
            counts["left"] += 1
        elif dry_run:
            out(f"  would fetch {url}")
            counts["new"] += 1
            counts["total"] += 1
        elif not is_http(url):
            counts["failed"] += 1
            known.reject(url, "failed: not an http(s) URL")
        else:
            try:
                data = http.get(url)
            except urllib.error.HTTPError as err:
                counts["failed"] += 1
                if err.code < 500 and err.code != 429:  # permanent; a server error is tried again next run
                    known.reject(url, f"failed: HTTP {err.code}")
                continue
            try:
                written = add_image(known, cls, url, data, min_distance, min_side)
            except Rejected as rejected:
                counts[rejected.kind] += 1
                known.reject(url, str(rejected))
            else:
                counts["new"] += 1
                counts["total"] += written  # an adopted file was counted already


def _print_report(report: dict[str, Counter], out: Callable[[str], None], dry_run: bool) -> None:
    heads = {"new": "to fetch" if dry_run else "downloaded", "too_small": "too small", "near_duplicate": "near-dup"}
    names = [heads.get(c, c) for c in COLUMNS]
    width = max([5, *map(len, report)])
    out(f"{'class':<{width}}  " + "  ".join(names))
    for cls, counts in report.items():
        out(f"{cls:<{width}}  " + "  ".join(f"{counts[c]:>{len(n)}}" for c, n in zip(COLUMNS, names)))
    out("had: already in the manifest (same URL or ImageNet photo); skipped: rejected by an earlier run "
        f"(see {STATE}); left: not tried, the class holds --max-per-class images")
