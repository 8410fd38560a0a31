"""`dogclf data fetch` end to end against a real HTTP server on 127.0.0.1 that answers like the dog.ceo API.

The served images are the real shared photos and variants of them (mirrored, enlarged, rotated by EXIF, re-encoded,
truncated, shrunk). Each test works on a small copy of the data root in tmp_path; nothing reaches the internet and the
shared folder is only read.
"""

from __future__ import annotations

import csv
import hashlib
import inspect
import io
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from PIL import Image, ImageOps, JpegImagePlugin

from dogclf import cli
from dogclf.data import DataError
from dogclf.data import fetch as fetch_module
from dogclf.data.fetch import (
    FIELDS,
    MANIFEST,
    MIN_DISTANCE,
    STATE,
    RateLimiter,
    distance,
    fetch,
    phash,
    retry_after,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
FAST = {"rate": 1000.0, "backoff": 0.25, "timeout": 5.0}  # the limiter is tested on its own below


# --- a dog.ceo look-alike --------------------------------------------------------------------------------------------


class DogApi:
    """Breed lists and image bytes on 127.0.0.1, scripted error answers, and a log of every request."""

    def __init__(self) -> None:
        self.breeds: dict[str, list[str]] = {}  # breed path -> image URLs
        self.images: dict[str, bytes] = {}  # URL path -> bytes
        self.script: dict[str, list[tuple[int, dict[str, str]]]] = {}  # URL path -> error answers to give first
        self.requests: Counter[str] = Counter()
        self.served: Counter[str] = Counter()  # 200 answers with image bytes
        self.agents: set[str] = set()
        self.die_after: int | None = None  # image requests answered before the server "dies" (drops connections)
        api = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                api.requests[self.path] += 1
                api.agents.add(self.headers.get("User-Agent", ""))
                dead = api.die_after is not None and api.image_requests() > api.die_after
                if self.path.startswith("/breeds/") and dead:
                    self.close_connection = True  # no answer at all: the client sees the connection drop
                    return
                if api.script.get(self.path):
                    status, headers = api.script[self.path].pop(0)
                    return self.answer(status, b'{"status": "error"}', "application/json", headers)
                if match := re.fullmatch(r"/api/breed/(.+)/images", self.path):
                    if match.group(1) in api.breeds:
                        body = {"message": api.breeds[match.group(1)], "status": "success"}
                        return self.answer(200, json.dumps(body).encode(), "application/json")
                    body = {"status": "error", "message": "Breed not found (main breed does not exist)", "code": 404}
                    return self.answer(404, json.dumps(body).encode(), "application/json")
                if self.path in api.images:
                    api.served[self.path] += 1
                    return self.answer(200, api.images[self.path], "image/jpeg")
                self.answer(404, b"not found", "text/plain")

            def answer(self, status: int, body: bytes, kind: str, headers: dict[str, str] | None = None) -> None:
                self.send_response(status)
                for key, value in {"Content-Type": kind, "Content-Length": str(len(body)), **(headers or {})}.items():
                    self.send_header(key, value)
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.base = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.api = f"{self.base}/api"
        threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True).start()

    def add(self, breed: str, name: str, data: bytes | None, *errors: tuple[int, dict[str, str]]) -> str:
        """List image `name` under `breed` (not served when data is None); its URL."""
        path = f"/breeds/{breed.replace('/', '-')}/{name}"
        self.breeds.setdefault(breed, []).append(self.base + path)
        if data is not None:
            self.images[path] = data
        if errors:
            self.script[path] = list(errors)
        return self.base + path

    def image_requests(self) -> int:
        return sum(n for p, n in self.requests.items() if p.startswith("/breeds/"))


@pytest.fixture(autouse=True)
def no_proxy(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("no_proxy", "NO_PROXY"):
        monkeypatch.setenv(name, "127.0.0.1,localhost")


@pytest.fixture
def server():
    api = DogApi()
    yield api
    api.server.shutdown()
    api.server.server_close()


# --- the photos ------------------------------------------------------------------------------------------------------


def jpeg(im: Image.Image, quality: int = 95, **params) -> bytes:
    out = io.BytesIO()
    im.save(out, "JPEG", quality=quality, **params)
    return out.getvalue()


@pytest.fixture(scope="module")
def shared_rows(white_dogs: Path) -> list[dict[str, str]]:
    """All bichon and spitz rows of the shared manifest, the first five maltese and samoyed ones."""
    with (white_dogs / MANIFEST).open(newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    by_class: dict[str, list[dict[str, str]]] = {}
    for row in rows:
        by_class.setdefault(row["breed"], []).append(row)
    return by_class["bichon_frise"] + by_class["spitz"] + by_class["maltese"][:5] + by_class["samoyed"][:5]


@pytest.fixture
def root(tmp_path: Path, white_dogs: Path, shared_rows) -> Path:
    """A small data root: 10 bichon, 5 spitz, 5 maltese, 5 samoyed photos and their manifest rows."""
    root = tmp_path / "dogs"
    for row in shared_rows:
        (root / row["breed"]).mkdir(parents=True, exist_ok=True)
        shutil.copyfile(white_dogs / row["file"], root / row["file"])
    with (root / MANIFEST).open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, FIELDS)
        writer.writeheader()
        writer.writerows(shared_rows)
    return root


@pytest.fixture(scope="module")
def photos(white_dogs: Path, shared_rows) -> dict[str, bytes]:
    """What the test server hands out, by role."""
    files = {row["file"]: white_dogs / row["file"] for row in shared_rows}
    spitz = [Image.open(p).convert("RGB") for f, p in files.items() if f.startswith("spitz/")]
    bichon = [Image.open(p).convert("RGB") for f, p in files.items() if f.startswith("bichon_frise/")]
    maltese = Image.open(next(p for f, p in files.items() if f.startswith("maltese/"))).convert("RGB")
    upright = ImageOps.mirror(bichon[3])
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: turn 90 degrees clockwise to display
    big = spitz[1].rotate(180).resize((spitz[1].width * 2, spitz[1].height * 2), Image.Resampling.BICUBIC)
    png = io.BytesIO()
    big.save(png, "PNG")
    new1 = jpeg(ImageOps.mirror(spitz[0]))
    made = {
        "new1": new1,
        "big_png": png.getvalue(),
        "retry": jpeg(ImageOps.mirror(bichon[0])),
        "429": jpeg(ImageOps.mirror(bichon[1])),
        "exif": jpeg(upright.transpose(Image.Transpose.ROTATE_90), exif=exif.tobytes()),
        "maltese": jpeg(ImageOps.mirror(maltese)),
        "exact": files[next(f for f in files if f.startswith("spitz/"))].read_bytes(),
        "near": jpeg(spitz[3].resize((spitz[3].width * 4 // 5, spitz[3].height * 4 // 5)), quality=70),
        "near_new1": jpeg(Image.open(io.BytesIO(new1)).resize((400, 300)), quality=75),
        "truncated": files[next(f for f in files if f.startswith("bichon_frise/"))].read_bytes()[:15000],
        "small": jpeg(bichon[2].resize((120, 90))),
    }
    # The "new" ones really are new: far in pHash from every photo of the root and from each other.
    hashes = {row["file"]: row["phash"] for row in shared_rows}
    fresh = {k: phash(Image.open(io.BytesIO(made[k]))) for k in ("new1", "big_png", "retry", "429", "maltese")}
    fresh["exif"] = phash(upright)
    for key, value in fresh.items():
        others = [h for k, h in {**hashes, **fresh}.items() if k != key]
        assert min(distance(value, h) for h in others) >= MIN_DISTANCE + 4, key
    return made


@pytest.fixture
def world(server: DogApi, photos: dict[str, bytes], shared_rows) -> dict[str, str]:
    """Four breeds on the server (spitz first: a bichon photo copies a spitz one fetched earlier); URLs by role."""
    maltese_id = Path(next(r for r in shared_rows if r["breed"] == "maltese")["source_path"]).stem
    samoyed_id = Path(next(r for r in shared_rows if r["breed"] == "samoyed")["source_path"]).stem
    add = server.add
    urls = {
        "new1": add("spitz/japanese", "spitz-1.jpg", photos["new1"]),
        "big_png": add("spitz/japanese", "spitz-2.png", photos["big_png"]),
        "exact": add("spitz/japanese", "spitz-3.jpg", photos["exact"]),
        "near": add("spitz/japanese", "spitz-4.jpg", photos["near"]),
        "truncated": add("spitz/japanese", "spitz-5.jpg", photos["truncated"]),
        "small": add("spitz/japanese", "spitz-6.jpg", photos["small"]),
        "retry": add("spitz/japanese", "spitz-7.jpg", photos["retry"], (500, {}), (500, {})),
        "429": add("spitz/japanese", "spitz-8.jpg", photos["429"], (429, {"Retry-After": "0"})),
        "exif": add("frise/bichon", "bichon-1.jpg", photos["exif"]),
        "near_new1": add("frise/bichon", "bichon-2.jpg", photos["near_new1"]),
        "missing": add("frise/bichon", "bichon-3.jpg", None),
        "imagenet": add("maltese", f"{maltese_id}.jpg", photos["maltese"]),  # the shared set has this photo
        "maltese": add("maltese", "maltese-1.jpg", photos["maltese"]),
        "imagenet_samoyed": add("samoyed", f"{samoyed_id}.jpg", photos["maltese"]),
        "not_http": "ftp://127.0.0.1/x.jpg",
    }
    server.breeds["samoyed"].append(urls["not_http"])
    return urls


BREEDS = {"spitz": "spitz/japanese", "bichon_frise": "frise/bichon", "maltese": "maltese", "samoyed": "samoyed"}
FIRST_RUN = {
    "spitz": {"listed": 8, "new": 4, "duplicate": 1, "near_duplicate": 1, "corrupt": 1, "too_small": 1, "total": 9},
    "bichon_frise": {"listed": 3, "new": 1, "near_duplicate": 1, "failed": 1, "total": 11},
    "maltese": {"listed": 2, "had": 1, "new": 1, "total": 6},
    "samoyed": {"listed": 2, "had": 1, "failed": 1, "total": 5},
}
SECOND_RUN = {
    "spitz": {"listed": 8, "had": 4, "skipped": 4, "total": 9},
    "bichon_frise": {"listed": 3, "had": 1, "skipped": 2, "total": 11},
    "maltese": {"listed": 2, "had": 2, "total": 6},
    "samoyed": {"listed": 2, "had": 1, "skipped": 1, "total": 5},
}


def manifest(root: Path) -> list[dict[str, str]]:
    with (root / MANIFEST).open(newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def state(root: Path) -> dict[str, str]:
    return json.loads((root / STATE).read_text())["rejected"]


def snapshot(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def run(root: Path, server: DogApi, breeds=BREEDS, **options) -> tuple[dict, list[str], list[float]]:
    lines: list[str] = []
    sleeps: list[float] = []
    report = fetch(root, breeds, api=server.api, out=lines.append, sleep=sleeps.append, **{**FAST, **options})
    return {cls: {k: v for k, v in counts.items() if v} for cls, counts in report.items()}, lines, sleeps


def check_consistent(root: Path) -> list[dict[str, str]]:
    """Every image file has exactly one manifest row and vice versa, and no temporary file is left."""
    rows = manifest(root)
    on_disk = sorted(p.relative_to(root).as_posix() for p in root.glob("*/*") if p.is_file())
    assert on_disk == sorted(r["file"] for r in rows)  # hidden .tmp files would show up here
    assert len({r["file"] for r in rows}) == len(rows)
    return rows


# --- tests -----------------------------------------------------------------------------------------------------------


def test_phash_reproduces_the_shared_manifest(white_dogs: Path) -> None:
    with (white_dogs / MANIFEST).open(newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    sample = rows[:: len(rows) // 50][:50]
    computed = [phash(Image.open(white_dogs / row["file"])) for row in sample]
    assert computed == [row["phash"] for row in sample]  # bit-exact (imagehash.phash)


def test_fetch_end_to_end_then_a_second_run_downloads_nothing(root: Path, server: DogApi, world, white_dogs) -> None:
    before = manifest(root)
    report, lines, sleeps = run(root, server)
    assert report == FIRST_RUN
    rows = check_consistent(root)
    assert rows[: len(before)] == before  # appended, the old rows untouched
    added = {r["source_path"]: r for r in rows[len(before) :]}
    assert set(added) == {world[k] for k in ("new1", "big_png", "retry", "429", "exif", "maltese")}
    reference = Image.open(white_dogs / before[0]["file"])
    for url, row in added.items():
        path = root / row["file"]
        data = path.read_bytes()
        assert path.name == hashlib.sha1(data).hexdigest() + ".jpg"
        folder = url.split("/")[-2]
        assert row["breed"] == path.parent.name == {"spitz-japanese": "spitz", "frise-bichon": "bichon_frise"}.get(
            folder, folder
        )
        assert (row["source_repo"], row["source_commit"]) == ("dog.ceo", "")
        im = Image.open(path)
        assert (im.format, im.mode, im.info.get("progressive", 0), JpegImagePlugin.get_sampling(im)) == (
            "JPEG", "RGB", 0, 2
        )
        assert im.quantization == reference.quantization  # quality 90, like the shared files
        assert not {"comment", "exif", "icc_profile"} & set(im.info)
        assert (int(row["width"]), int(row["height"])) == im.size and max(im.size) <= 512
        assert row["phash"] == phash(im)
    assert Image.open(root / added[world["big_png"]]["file"]).size == (512, 341)  # 1024x682 PNG shrunk
    exif = Image.open(root / added[world["exif"]]["file"])
    assert exif.size == (512, 341)  # stored 341x512 with "turn clockwise", saved upright
    assert distance(phash(exif), phash(ImageOps.mirror(Image.open(root / before[3]["file"])))) <= 2

    new1 = added[world["new1"]]["file"]
    rejected = state(root)
    assert rejected[world["exact"]] == f"duplicate of {before[10]['file']}"
    assert rejected[world["near"]].startswith(f"near-duplicate of {before[13]['file']} (pHash distance ")
    assert rejected[world["near_new1"]].startswith(f"near-duplicate of {new1} ")  # same run, another class
    assert rejected[world["truncated"]].startswith("corrupt: OSError: image file is truncated")
    assert rejected[world["small"]] == "too small: 120x90 (shorter side < 128 px)"
    assert rejected[world["missing"]] == "failed: HTTP 404"
    assert rejected[world["not_http"]] == "failed: not an http(s) URL"
    assert len(rejected) == 7

    url_path = world["retry"].removeprefix(server.base)
    assert server.requests[url_path] == 3  # 500, 500, then the image
    assert server.requests[world["429"].removeprefix(server.base)] == 2
    assert [s for s in sleeps if s >= 0.2] == [0.25, 0.5]  # backoff doubles; Retry-After: 0 waits 0
    assert 0.0 in sleeps
    assert server.requests[world["imagenet"].removeprefix(server.base)] == 0  # known ImageNet photo: not downloaded
    assert server.image_requests() == 15 and set(server.agents) == {fetch_module.USER_AGENT}
    assert any(line.startswith("spitz ") and line.split()[-1] == "9" for line in lines)  # the table

    first = snapshot(root)
    report, _, _ = run(root, server)
    assert report == SECOND_RUN
    assert server.image_requests() == 15  # nothing downloaded again
    assert snapshot(root) == first


def test_interrupted_run_resumes_without_downloading_twice(root: Path, server: DogApi, world) -> None:
    server.die_after = 3  # answers three image requests, then drops every connection
    with pytest.raises(DataError, match=rf"cannot reach {server.base[7:]} after 2 tries \(RemoteDisconnected: "):
        run(root, server, retries=1)
    rows = check_consistent(root)
    assert [r["source_path"] for r in rows[-2:]] == [world["new1"], world["big_png"]]
    assert list(state(root)) == [world["exact"]]

    server.die_after = None
    report, _, _ = run(root, server)
    assert report["spitz"] == {
        "listed": 8, "had": 2, "skipped": 1, "new": 2, "near_duplicate": 1, "corrupt": 1, "too_small": 1, "total": 9
    }
    assert {k: report[k] for k in ("bichon_frise", "maltese", "samoyed")} == {
        k: FIRST_RUN[k] for k in ("bichon_frise", "maltese", "samoyed")
    }
    check_consistent(root)
    assert max(server.served.values()) == 1  # no image was downloaded twice

    # A crash between the rename and the manifest row leaves a file without a row: the next run adopts it.
    lines = (root / MANIFEST).read_bytes().splitlines(keepends=True)
    orphan = root / manifest(root)[-1]["file"]
    (root / MANIFEST).write_bytes(b"".join(lines[:-1]))
    mtime = orphan.stat().st_mtime_ns
    report, _, _ = run(root, server)
    assert report["maltese"] == {"listed": 2, "had": 1, "new": 1, "total": 6}
    assert check_consistent(root)[-1]["file"] == orphan.relative_to(root).as_posix()
    assert orphan.stat().st_mtime_ns == mtime  # not written again


def test_max_per_class_stops_and_a_later_run_continues(root: Path, server: DogApi, world) -> None:
    report, _, _ = run(root, server, breeds={"spitz": "spitz/japanese"}, max_per_class=7)
    assert report == {"spitz": {"listed": 8, "new": 2, "left": 6, "total": 7}}
    assert server.image_requests() == 2
    report, _, _ = run(root, server, breeds={"spitz": "spitz/japanese"}, max_per_class=8)
    assert report == {"spitz": {"listed": 8, "had": 2, "duplicate": 1, "near_duplicate": 1, "corrupt": 1,
                                "too_small": 1, "new": 1, "left": 1, "total": 8}}
    report, _, _ = run(root, server, breeds={"spitz": "spitz/japanese"})
    assert report == {"spitz": {"listed": 8, "had": 3, "skipped": 4, "new": 1, "total": 9}}
    assert max(server.served.values()) == 1
    check_consistent(root)


def test_dry_run_lists_and_writes_nothing(root: Path, server: DogApi, world) -> None:
    before = snapshot(root)
    report, lines, _ = run(root, server, breeds={"spitz": "spitz/japanese", "maltese": "maltese"}, dry_run=True)
    assert report == {"spitz": {"listed": 8, "new": 8, "total": 13}, "maltese": {"listed": 2, "had": 1, "new": 1,
                                                                                 "total": 6}}
    assert f"  would fetch {world['new1']}" in lines and f"  would fetch {world['imagenet']}" not in lines
    assert server.image_requests() == 0 and snapshot(root) == before


def test_an_image_that_keeps_failing_is_tried_again_next_run(root: Path, server: DogApi) -> None:
    url = server.add("spitz", "broken.jpg", b"never served", *[(503, {})] * 6)
    assert run(root, server, breeds={"spitz": "spitz"}, retries=2)[0]["spitz"]["failed"] == 1
    assert server.requests[url.removeprefix(server.base)] == 3 and not (root / STATE).exists()
    assert run(root, server, breeds={"spitz": "spitz"}, retries=2)[0]["spitz"]["failed"] == 1
    assert server.requests[url.removeprefix(server.base)] == 6


def test_manifest_rows_append_after_a_missing_final_newline(tmp_path: Path) -> None:
    path = tmp_path / MANIFEST
    row = dict(zip(FIELDS, ["a/1.jpg", "a", "dog.ceo", "", "http://x/ü.jpg", "2", "3", "0" * 16], strict=True))
    fetch_module.append_row(path, row)  # a new manifest starts with the header
    path.write_bytes(path.read_bytes().rstrip(b"\r\n"))
    fetch_module.append_row(path, {**row, "file": "a/2.jpg"})
    assert path.read_bytes().count(b"\r\n") == 3 and [r["file"] for r in manifest(tmp_path)] == ["a/1.jpg", "a/2.jpg"]
    assert manifest(tmp_path)[0]["source_path"] == "http://x/ü.jpg"


def test_rate_limiter_spaces_requests() -> None:
    now, slept = [100.0], []

    def sleep(seconds: float) -> None:
        slept.append(seconds)
        now[0] += seconds

    limiter = RateLimiter(2.0, clock=lambda: now[0], sleep=sleep)
    for advance in (0.0, 0.0, 0.1, 0.0, 5.0):
        now[0] += advance
        limiter.wait()
    assert slept == pytest.approx([0.5, 0.4, 0.5])
    real = RateLimiter(50.0)  # and with the real clock: 5 calls span at least 4 intervals
    start = time.monotonic()
    for _ in range(5):
        real.wait()
    assert time.monotonic() - start >= 4 / 50 - 1e-3


def test_retry_after_header() -> None:
    assert retry_after("0") == 0.0 and retry_after("2.5") == 2.5 and retry_after("9999") == 120.0
    assert retry_after(None) is None and retry_after("soon") is None
    date = time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime(time.time() + 30))
    assert 27 <= retry_after(date) <= 31


def test_cli_help_states_the_defaults_of_fetch() -> None:
    parser = cli.build_parser()
    fetch_parser = parser._subparsers._group_actions[0].choices["data"]._subparsers._group_actions[0].choices["fetch"]
    defaults = {k: p.default for k, p in inspect.signature(fetch).parameters.items()}
    actions = {a.dest: a for a in fetch_parser._actions}
    for dest in ("rate", "retries", "backoff", "timeout", "min_distance", "min_side", "api"):
        assert actions[dest].default is None  # left out: fetch()'s own default applies
        value = defaults[dest]
        expected = f"(default {value:g})" if isinstance(value, float | int) else f"(default {value})"
        assert expected in actions[dest].help, dest


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_cli_unknown_breed_and_unreachable_server_are_one_line_errors(root: Path, server: DogApi, world) -> None:
    before, port = snapshot(root), free_port()
    base = [sys.executable, "-m", "dogclf.cli", "data", "fetch", "--root", str(root), "--rate", "1000"]
    commands = {
        "breed": [*base, "--api", server.api, "--breed", "spitz=spitz/japanese", "--breed", "spitz2=nosuch/breed"],
        "down": [*base, "--api", f"http://127.0.0.1:{port}/api", "--retries", "1", "--backoff", "0"],
    }
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    procs = {k: subprocess.Popen(c, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                 text=True) for k, c in commands.items()}  # both at once: each imports torch
    done = {k: (p.wait(timeout=60), *p.communicate()) for k, p in procs.items()}
    for key, expected in {
        "breed": "error: dog.ceo has no breed 'nosuch/breed' for class spitz2 (Breed not found (main breed does not "
        "exist)): fix it with --breed spitz2=BREED[/SUB-BREED]\n",
        "down": f"error: cannot reach 127.0.0.1:{port} after 2 tries (ConnectionRefusedError: [Errno 111] Connection "
        "refused): check the network or --api",
    }.items():
        code, _, err = done[key]
        assert code == 2 and err.startswith(expected) and err.count("\n") == 1, (key, err)
    assert server.image_requests() == 0 and snapshot(root) == before  # the unknown breed stops everything


def test_cli_fetches_and_reports_user_errors(root: Path, server: DogApi, world, tmp_path: Path, capsys) -> None:
    def main(*args: str) -> tuple[int, str, str]:
        code = cli.main(["data", "fetch", "--api", server.api, "--rate", "1000", *args])
        out, err = capsys.readouterr()
        return code, out, err

    code, out, err = main("--root", str(root), "--breed", "maltese=maltese", "--max-per-class", "9")
    assert code == 0 and err == "" and re.search(r"^maltese +2 +1 +0 +1( +0){6} +6$", out, re.MULTILINE), out
    readonly = tmp_path / "readonly"
    readonly.mkdir()
    readonly.chmod(0o555)
    if os.access(readonly, os.W_OK):  # root ignores permission bits: take a kernel folder that refuses new files
        readonly = Path("/sys")
    for args, message in [
        (["--root", str(readonly)], f"error: cannot write to data root {readonly} ("),
        (["--root", str(tmp_path / "nope")], f"error: data root {tmp_path / 'nope'} does not exist"),
        (["--root", str(root), "--breed", "spitz"], "error: --breed 'spitz': expected CLASS=BREED"),
        (["--root", str(root), "--rate", "0"], "error: --rate 0.0 is out of range"),
    ]:
        code, out, err = main(*args)
        assert code == 2 and err.startswith(message) and err.count("\n") == 1, err
