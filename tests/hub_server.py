"""A local stand-in for the part of the Hugging Face Hub HTTP API that ``huggingface_hub``, timm and datasets use.

It speaks the same endpoints, payloads and headers as the Hub (checked against huggingface_hub 2.4's
``hf_api.py``, ``_commit_api.py``, ``lfs.py`` and ``file_download.py``), so push and download code paths run
unchanged against ``HF_ENDPOINT=http://127.0.0.1:PORT``. Model, dataset and Space repos are served; every route
below exists for all three, with ``models`` -> ``datasets``/``spaces`` in ``/api/...`` routes and a ``datasets/``
or ``spaces/`` prefix before the repo id in git-style routes (``/datasets/{repo}/resolve/...``,
``/spaces/{repo}.git/...``), as on the Hub:

- ``POST /api/repos/create`` (``type`` model, dataset or space, a Space with its ``sdk``; 409 when the repo
  exists), ``POST /api/validate-yaml``
- ``POST /api/models/{repo}/preupload/{rev}`` (upload mode and remote oid per file)
- ``POST /{repo}.git/info/lfs/objects/batch`` + ``PUT /_lfs/{oid}`` (basic transfer, sha256 checked)
- ``POST /api/models/{repo}/commit/{rev}`` (NDJSON: header, file, lfsFile, deletedFile, deletedFolder)
- ``POST /api/models/{repo}/branch/{branch}``
- ``GET /api/models/{repo}[/revision/{rev}]`` (siblings, sha), ``GET .../tree/{rev}[/{path}]``,
  ``POST .../paths-info/{rev}``, ``GET .../commits/{rev}``, ``GET .../refs``
- ``HEAD``/``GET /{repo}/resolve/{rev}/{path}`` with ``X-Repo-Commit``, ``ETag`` and, for LFS files,
  ``X-Linked-Etag``/``X-Linked-Size``; Hub error codes in ``X-Error-Code``.

Writes need ``Authorization: Bearer <token>`` when the server has a token. Faults can be injected per
endpoint (``fail_next``) to test retries and interrupted pushes. State (LFS objects and repo metadata) is also
written to ``storage_dir`` so tests can scan everything the server kept.
"""

from __future__ import annotations

import base64
import fnmatch
import hashlib
import io
import json
import socket
import threading
import time
import urllib.parse
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import yaml

LFS_EXTENSIONS = ("*.safetensors", "*.bin", "*.pt", "*.pth", "*.png", "*.jpg", "*.jpeg", "*.ckpt", "*.onnx")
# Dataset repos on the Hub also track columnar data files with LFS.
DATASET_LFS_EXTENSIONS = (*LFS_EXTENSIONS, "*.parquet", "*.arrow")
LFS_SIZE_THRESHOLD = 10 * 1024 * 1024
REPO_TYPES = ("model", "dataset", "space")
SPACE_SDKS = ("gradio", "docker", "static")


def gitattributes(patterns: tuple[str, ...]) -> bytes:
    return "".join(f"{p} filter=lfs diff=lfs merge=lfs -text\n" for p in patterns).encode()


GITATTRIBUTES = gitattributes(LFS_EXTENSIONS)


def repo_key(repo_id: str, repo_type: str = "model") -> str:
    """Where the repo lives on the Hub, relative to the endpoint: ``org/name``, ``datasets/org/name`` or
    ``spaces/org/name``."""
    return repo_id if repo_type == "model" else f"{repo_type}s/{repo_id}"


def git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def lfs_pointer(sha256: str, size: int) -> bytes:
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()


@dataclass(frozen=True)
class RepoFileEntry:
    path: str
    size: int
    git_oid: str  # sha1 of the git blob (of the pointer for LFS files)
    sha256: str | None  # LFS object id, None for regular files
    content: bytes | None  # regular files only; LFS content lives in the object store

    @property
    def oid_for_preupload(self) -> str:
        # The client compares this with sha256 for LFS files and the git sha1 for regular files.
        return self.sha256 or self.git_oid


@dataclass
class Commit:
    oid: str
    parent: str | None
    title: str
    message: str
    date: str
    files: dict[str, RepoFileEntry]


@dataclass
class Repo:
    repo_id: str
    private: bool
    repo_type: str = "model"
    branches: dict[str, str] = field(default_factory=dict)
    sdk: str | None = None  # Spaces only
    commits: dict[str, Commit] = field(default_factory=dict)


@dataclass
class Fault:
    """What to do to the next request(s) of one endpoint.

    ``mode``: ``"error"`` answers ``status`` without doing anything; ``"drop"`` closes the connection without
    doing anything; ``"drop_after"`` does the work, then closes the connection before answering.
    """

    mode: str
    status: int = 500
    times: int = 1


class HubState:
    def __init__(self, storage_dir: Path | None = None) -> None:
        self.lock = threading.RLock()
        self.repos: dict[str, Repo] = {}
        self.lfs_objects: dict[str, bytes] = {}
        self.storage_dir = storage_dir
        self._counter = 0

    # -- persistence (so tests can scan everything the server stored) --
    def persist(self) -> None:
        if self.storage_dir is None:
            return
        objects = self.storage_dir / "lfs"
        objects.mkdir(parents=True, exist_ok=True)
        for oid, data in self.lfs_objects.items():
            path = objects / oid
            if not path.exists():
                path.write_bytes(data)
        meta = {
            key: {
                "repo_id": repo.repo_id,
                "repo_type": repo.repo_type,
                "private": repo.private,
                "branches": repo.branches,
                "commits": {
                    oid: {
                        "parent": c.parent,
                        "title": c.title,
                        "message": c.message,
                        "files": {
                            p: {
                                "size": e.size,
                                "git_oid": e.git_oid,
                                "sha256": e.sha256,
                                "content_b64": base64.b64encode(e.content).decode() if e.content is not None else None,
                            }
                            for p, e in c.files.items()
                        },
                    }
                    for oid, c in repo.commits.items()
                },
            }
            for key, repo in self.repos.items()
        }
        (self.storage_dir / "repos.json").write_text(json.dumps(meta, indent=1))

    def new_commit(
        self, repo: Repo, parent: str | None, title: str, message: str, files: dict[str, RepoFileEntry]
    ) -> Commit:
        self._counter += 1
        tree = json.dumps(sorted((p, e.git_oid) for p, e in files.items()))
        oid = hashlib.sha1(f"{parent}\n{tree}\n{title}\n{message}\n{self._counter}".encode()).hexdigest()
        commit = Commit(oid, parent, title, message, time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime()), files)
        repo.commits[oid] = commit
        return commit

    def create_repo(self, repo_id: str, private: bool, repo_type: str = "model", sdk: str | None = None) -> bool:
        with self.lock:
            key = repo_key(repo_id, repo_type)
            if key in self.repos:
                return False
            repo = Repo(repo_id, private, repo_type, sdk=sdk)
            attributes = gitattributes(DATASET_LFS_EXTENSIONS) if repo_type == "dataset" else GITATTRIBUTES
            entry = RepoFileEntry(".gitattributes", len(attributes), git_blob_sha1(attributes), None, attributes)
            commit = self.new_commit(repo, None, "initial commit", "", {".gitattributes": entry})
            repo.branches["main"] = commit.oid
            self.repos[key] = repo
            self.persist()
            return True

    def resolve(self, repo: Repo, revision: str) -> Commit | None:
        revision = urllib.parse.unquote(revision)
        if revision in repo.branches:
            return repo.commits[repo.branches[revision]]
        matches = [c for oid, c in repo.commits.items() if len(revision) >= 7 and oid.startswith(revision)]
        return matches[0] if len(matches) == 1 else None

    # -- helpers for tests --
    def files(self, repo_id: str, revision: str = "main", repo_type: str = "model") -> dict[str, str]:
        """path -> sha256 of the content, at ``revision``."""
        with self.lock:
            repo = self.repos[repo_key(repo_id, repo_type)]
            commit = self.resolve(repo, revision)
            assert commit is not None
            return {p: e.sha256 or hashlib.sha256(e.content or b"").hexdigest() for p, e in commit.files.items()}

    def read(self, repo_id: str, path: str, revision: str = "main", repo_type: str = "model") -> bytes:
        with self.lock:
            commit = self.resolve(self.repos[repo_key(repo_id, repo_type)], revision)
            assert commit is not None
            entry = commit.files[path]
            return self.lfs_objects[entry.sha256] if entry.sha256 else (entry.content or b"")

    def history(self, repo_id: str, revision: str = "main", repo_type: str = "model") -> list[Commit]:
        """Commits reachable from ``revision``, newest first."""
        with self.lock:
            repo = self.repos[repo_key(repo_id, repo_type)]
            commit = self.resolve(repo, revision)
            out = []
            while commit is not None:
                out.append(commit)
                commit = repo.commits.get(commit.parent) if commit.parent else None
            return out


class HubRequestHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: LocalHubServer

    def log_message(self, format: str, *args: Any) -> None:
        # Request lines never hold credentials (those travel in headers); keep a log for assertions.
        self.server.request_log.append(f"{self.command} {self.path}")

    # ---------- plumbing ----------
    @property
    def state(self) -> HubState:
        return self.server.state

    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().strip().split(b";")[0], 16)
                if size == 0:
                    self.rfile.readline()
                    break
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
            return b"".join(chunks)
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _send(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None, head: bool = False) -> None:
        self.send_response(status)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if not head:
            self.wfile.write(body)

    def _json(self, status: int, data: Any, headers: dict[str, str] | None = None) -> None:
        self._send(status, json.dumps(data).encode(), {"Content-Type": "application/json", **(headers or {})})

    def _error(self, status: int, message: str, code: str | None = None, head: bool = False) -> None:
        headers = {"Content-Type": "application/json", "X-Error-Message": message}
        if code:
            headers["X-Error-Code"] = code
        self._send(status, json.dumps({"error": message}).encode(), headers, head=head)

    def _authorized(self) -> bool:
        expected = self.server.token
        if expected is None:
            return True
        return self.headers.get("Authorization") == f"Bearer {expected}"

    def _repo(self, key: str, head: bool = False) -> Repo | None:
        """The repo at ``key`` (``org/name``, ``datasets/org/name`` or ``spaces/org/name``), or a 404 answer."""
        repo = self.state.repos.get(key)
        if repo is None or (repo.private and not self._authorized()):
            self._error(404, "Repository not found", "RepoNotFound", head=head)
            return None
        return repo

    def _dispatch(self, method: str) -> None:
        url = urllib.parse.urlsplit(self.path)
        path, query = url.path, urllib.parse.parse_qs(url.query)
        endpoint = _endpoint_name(method, path)
        self.server.attempts.append(endpoint)
        fault = self.server.take_fault(endpoint)
        body = self._body() if method in ("POST", "PUT") else b""
        if fault is not None and fault.mode == "error":
            self._error(fault.status, f"injected {fault.status} on {endpoint}")
            return
        if fault is None or fault.mode != "drop":
            real_wfile = self.wfile
            if fault is not None and fault.mode == "drop_after":
                self.wfile = io.BytesIO()  # do the work, swallow the answer
            self.server.calls.append(endpoint)
            self._route(method, path, query, body)
            self.wfile = real_wfile
            if fault is None:
                return
        # Abort the TCP connection so the client sees a transport error, not an HTTP answer.
        self.close_connection = True
        self.connection.shutdown(socket.SHUT_RDWR)

    def _route(self, method: str, path: str, query: dict[str, list[str]], body: bytes) -> None:
        parts = [urllib.parse.unquote(p) for p in path.strip("/").split("/")]
        if method == "POST" and path == "/api/repos/create":
            return self._create_repo(body)
        if method == "POST" and path == "/api/validate-yaml":
            return self._validate_yaml(body)
        if method == "PUT" and parts[0] == "_lfs":
            return self._lfs_put(parts[1], body)
        if method == "POST" and path.endswith(".git/info/lfs/objects/batch"):
            key = path.strip("/").removesuffix(".git/info/lfs/objects/batch")
            return self._lfs_batch(key, body)
        if parts[0] == "api" and len(parts) >= 4 and parts[1] in ("models", "datasets", "spaces"):
            key = repo_key(f"{parts[2]}/{parts[3]}", parts[1][:-1])
            rest = parts[4:]
            if method == "GET" and not rest:
                return self._repo_info(key, "main")
            if method == "GET" and rest[0] == "revision" and len(rest) >= 2:
                return self._repo_info(key, "/".join(rest[1:]))
            if method == "POST" and rest[0] == "preupload":
                return self._preupload(key, "/".join(rest[1:]), body)
            if method == "POST" and rest[0] == "commit":
                return self._commit(key, "/".join(rest[1:]), body)
            if method == "POST" and rest[0] == "branch":
                return self._create_branch(key, "/".join(rest[1:]), body)
            if method == "GET" and rest[0] == "tree":
                return self._tree(key, rest[1], "/".join(rest[2:]), query)
            if method == "POST" and rest[0] == "paths-info":
                return self._paths_info(key, "/".join(rest[1:]), body)
            if method == "GET" and rest[0] == "commits":
                return self._commits(key, "/".join(rest[1:]))
            if method == "GET" and rest[0] == "refs":
                return self._refs(key)
        if method in ("GET", "HEAD"):
            # /{org}/{name}/resolve/{rev}/{path} for models, /datasets/{org}/{name}/resolve/... for datasets.
            offset = 1 if parts[0] in ("datasets", "spaces") else 0
            if len(parts) >= 5 + offset and parts[2 + offset] == "resolve":
                key = "/".join(parts[: 2 + offset])
                rest = parts[3 + offset :]
                return self._resolve(key, rest[0], "/".join(rest[1:]), head=method == "HEAD")
        self._error(404, f"no route for {method} {path}")

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_HEAD(self) -> None:
        self._dispatch("HEAD")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_PUT(self) -> None:
        self._dispatch("PUT")

    # ---------- write endpoints ----------
    def _create_repo(self, body: bytes) -> None:
        if not self._authorized():
            return self._error(401, "Invalid credentials in Authorization header")
        payload = json.loads(body)
        repo_type = payload.get("type") or "model"
        if repo_type not in REPO_TYPES:
            return self._error(400, f"this server only hosts {', '.join(REPO_TYPES)} repos")
        sdk = payload.get("sdk")
        if repo_type == "space" and sdk not in SPACE_SDKS:
            return self._error(400, f"a Space needs an sdk, one of {', '.join(SPACE_SDKS)}; got {sdk!r}")
        repo_id = f"{payload['organization']}/{payload['name']}" if payload.get("organization") else payload["name"]
        url = f"{self.server.url}/{repo_key(repo_id, repo_type)}"
        private = payload.get("visibility") == "private" or bool(payload.get("private"))
        if not self.state.create_repo(repo_id, private, repo_type, sdk if repo_type == "space" else None):
            return self._json(409, {"error": f"You already created this {repo_type} repo", "url": url})
        self._json(200, {"url": url, "name": repo_id, "id": repo_id})

    def _validate_yaml(self, body: bytes) -> None:
        content = json.loads(body)["content"]
        errors = []
        if content.startswith("---"):
            try:
                meta = yaml.safe_load(content.split("---", 2)[1])
                if not isinstance(meta, dict):
                    errors.append({"message": "metadata must be a mapping"})
            except yaml.YAMLError as e:
                errors.append({"message": f"invalid YAML: {e}"})
        self._json(400 if errors else 200, {"errors": errors, "warnings": []})

    def _write_target(self, key: str, revision: str) -> tuple[Repo, Commit] | None:
        if not self._authorized():
            self._error(401, "Invalid credentials in Authorization header")
            return None
        repo = self._repo(key)
        if repo is None:
            return None
        commit = self.state.resolve(repo, revision)
        if commit is None:
            self._error(404, f"Invalid rev id: {revision}", "RevisionNotFound")
            return None
        return repo, commit

    def _preupload(self, key: str, revision: str, body: bytes) -> None:
        with self.state.lock:
            target = self._write_target(key, revision)
            if target is None:
                return
            repo, commit = target
            patterns = DATASET_LFS_EXTENSIONS if repo.repo_type == "dataset" else LFS_EXTENSIONS
            files = []
            for f in json.loads(body)["files"]:
                sample = base64.b64decode(f["sample"])
                lfs = (
                    any(fnmatch.fnmatch(f["path"].rsplit("/", 1)[-1], p) for p in patterns)
                    or f["size"] > LFS_SIZE_THRESHOLD
                    or b"\0" in sample
                )
                existing = commit.files.get(f["path"])
                files.append(
                    {
                        "path": f["path"],
                        "uploadMode": "lfs" if lfs else "regular",
                        "shouldIgnore": False,
                        "oid": existing.oid_for_preupload if existing else None,
                    }
                )
        self._json(200, {"files": files, "commitOid": commit.oid})

    def _lfs_batch(self, key: str, body: bytes) -> None:
        if not self._authorized():
            return self._error(401, "Invalid credentials in Authorization header")
        if self._repo(key) is None:
            return
        payload = json.loads(body)
        objects = []
        for obj in payload["objects"]:
            entry: dict[str, Any] = {"oid": obj["oid"], "size": obj["size"]}
            if obj["oid"] not in self.state.lfs_objects:
                # An upload URL that needs no Authorization header, like the Hub's pre-signed S3 URLs.
                entry["actions"] = {"upload": {"href": f"{self.server.url}/_lfs/{obj['oid']}", "header": {}}}
            objects.append(entry)
        self._json(200, {"transfer": "basic", "objects": objects}, {"Content-Type": "application/vnd.git-lfs+json"})

    def _lfs_put(self, oid: str, body: bytes) -> None:
        if hashlib.sha256(body).hexdigest() != oid:
            return self._error(400, "uploaded content does not match its sha256")
        with self.state.lock:
            self.state.lfs_objects[oid] = body
            self.state.persist()
        self._send(200, b"", {"ETag": f'"{oid[:32]}"'})

    def _commit(self, key: str, revision: str, body: bytes) -> None:
        with self.state.lock:
            target = self._write_target(key, revision)
            if target is None:
                return
            repo, parent = target
            branch = urllib.parse.unquote(revision)
            if branch not in repo.branches:
                return self._error(400, "commits go to a branch, not to a commit id")
            lines = [json.loads(line) for line in body.splitlines() if line.strip()]
            header = next((x["value"] for x in lines if x["key"] == "header"), None)
            if header is None:
                return self._error(400, "missing header line")
            if header.get("parentCommit") and not parent.oid.startswith(header["parentCommit"]):
                return self._error(412, "A commit has happened since. Please refresh and try again.")
            files = dict(parent.files)
            for item in lines:
                value = item["value"]
                if item["key"] == "file":
                    data = base64.b64decode(value["content"])
                    files[value["path"]] = RepoFileEntry(value["path"], len(data), git_blob_sha1(data), None, data)
                elif item["key"] == "lfsFile":
                    data = self.state.lfs_objects.get(value["oid"])
                    if data is None:
                        return self._error(400, f"LFS object {value['oid']} was never uploaded ({value['path']})")
                    pointer = lfs_pointer(value["oid"], len(data))
                    files[value["path"]] = RepoFileEntry(
                        value["path"], len(data), git_blob_sha1(pointer), value["oid"], None
                    )
                elif item["key"] == "deletedFile":
                    if value["path"] not in files:
                        return self._error(404, "A file with this name doesn't exist", "EntryNotFound")
                    del files[value["path"]]
                elif item["key"] == "deletedFolder":
                    prefix = value["path"].rstrip("/") + "/"
                    files = {p: e for p, e in files.items() if not p.startswith(prefix)}
            commit = self.state.new_commit(repo, parent.oid, header["summary"], header.get("description", ""), files)
            repo.branches[branch] = commit.oid
            self.state.persist()
        self._json(
            200,
            {
                "success": True,
                "commitOid": commit.oid,
                "commitUrl": f"{self.server.url}/{key}/commit/{commit.oid}",
                "pullRequestUrl": None,
            },
        )

    def _create_branch(self, key: str, branch: str, body: bytes) -> None:
        with self.state.lock:
            if not self._authorized():
                return self._error(401, "Invalid credentials in Authorization header")
            repo = self._repo(key)
            if repo is None:
                return
            if branch in repo.branches:
                return self._error(409, f"Reference already exists: {branch}")
            start = (json.loads(body) if body else {}).get("startingPoint") or "main"
            commit = self.state.resolve(repo, start)
            if commit is None:
                return self._error(404, f"Invalid rev id: {start}", "RevisionNotFound")
            repo.branches[branch] = commit.oid
            self.state.persist()
        self._json(200, {})

    # ---------- read endpoints ----------
    def _read_target(self, key: str, revision: str, head: bool = False) -> tuple[Repo, Commit] | None:
        repo = self._repo(key, head=head)
        if repo is None:
            return None
        commit = self.state.resolve(repo, revision)
        if commit is None:
            self._error(404, f"Invalid rev id: {revision}", "RevisionNotFound", head=head)
            return None
        return repo, commit

    def _repo_info(self, key: str, revision: str) -> None:
        target = self._read_target(key, revision)
        if target is None:
            return
        repo, commit = target
        siblings = [
            {"rfilename": p, "size": e.size, "blobId": e.git_oid}
            | (
                {
                    "lfs": {
                        "sha256": e.sha256,
                        "size": e.size,
                        "pointerSize": len(lfs_pointer(e.sha256, e.size)),
                    }
                }
                if e.sha256
                else {}
            )
            for p, e in sorted(commit.files.items())
        ]
        self._json(
            200,
            {
                "id": repo.repo_id,
                **({"modelId": repo.repo_id} if repo.repo_type == "model" else {}),
                **({"sdk": repo.sdk} if repo.repo_type == "space" else {}),
                "author": repo.repo_id.split("/")[0],
                "sha": commit.oid,
                "lastModified": commit.date,
                "private": repo.private,
                "siblings": siblings,
                "tags": [],
            },
        )

    @staticmethod
    def _file_info(entry: RepoFileEntry) -> dict[str, Any]:
        info: dict[str, Any] = {"type": "file", "path": entry.path, "size": entry.size, "oid": entry.git_oid}
        if entry.sha256:
            info["lfs"] = {
                "oid": entry.sha256,
                "size": entry.size,
                "pointerSize": len(lfs_pointer(entry.sha256, entry.size)),
            }
        return info

    def _tree(self, key: str, revision: str, prefix: str, query: dict[str, list[str]]) -> None:
        target = self._read_target(key, revision)
        if target is None:
            return
        _, commit = target
        recursive = query.get("recursive", ["False"])[0].lower() in ("1", "true")
        base = prefix.strip("/") + "/" if prefix.strip("/") else ""
        out: dict[str, dict[str, Any]] = {}
        for path, entry in sorted(commit.files.items()):
            if not path.startswith(base):
                continue
            rest = path[len(base) :].split("/")
            # Folders on the way down.
            for depth in range(1, len(rest)):
                folder = base + "/".join(rest[:depth])
                if depth == 1 or recursive:
                    out.setdefault(
                        folder,
                        {
                            "type": "directory",
                            "path": folder,
                            "oid": hashlib.sha1(folder.encode()).hexdigest(),
                        },
                    )
            if len(rest) == 1 or recursive:
                out[path] = self._file_info(entry)
        if base and not out:
            return self._error(404, f"{prefix} does not exist", "EntryNotFound")
        self._json(200, list(out.values()))

    def _paths_info(self, key: str, revision: str, body: bytes) -> None:
        target = self._read_target(key, revision)
        if target is None:
            return
        _, commit = target
        form = urllib.parse.parse_qs(body.decode())
        out = []
        for p in form.get("paths", []):
            if p in commit.files:
                out.append(self._file_info(commit.files[p]))
            elif any(f.startswith(p.rstrip("/") + "/") for f in commit.files):
                out.append({"type": "directory", "path": p, "oid": hashlib.sha1(p.encode()).hexdigest()})
        self._json(200, out)

    def _commits(self, key: str, revision: str) -> None:
        target = self._read_target(key, revision)
        if target is None:
            return
        repo, _ = target
        history = self.state.history(repo.repo_id, revision, repo.repo_type)
        self._json(
            200,
            [
                {
                    "id": c.oid,
                    "authors": [{"user": "local"}],
                    "date": c.date,
                    "title": c.title,
                    "message": c.message,
                }
                for c in history
            ],
        )

    def _refs(self, key: str) -> None:
        repo = self._repo(key)
        if repo is None:
            return
        branches = [{"name": b, "ref": f"refs/heads/{b}", "targetCommit": oid} for b, oid in repo.branches.items()]
        self._json(200, {"branches": branches, "converts": [], "tags": []})

    def _resolve(self, key: str, revision: str, filename: str, head: bool) -> None:
        target = self._read_target(key, revision, head=head)
        if target is None:
            return
        _, commit = target
        entry = commit.files.get(filename)
        if entry is None:
            return self._error(404, f"Entry not found: {filename}", "EntryNotFound", head=head)
        headers = {"X-Repo-Commit": commit.oid, "ETag": f'"{entry.git_oid}"', "Accept-Ranges": "bytes"}
        if entry.sha256:
            data = self.state.lfs_objects[entry.sha256]
            headers.update({"X-Linked-Etag": f'"{entry.sha256}"', "X-Linked-Size": str(entry.size)})
        else:
            data = entry.content or b""
        status = 200
        range_header = self.headers.get("Range")
        if range_header and range_header.startswith("bytes=") and not head:
            start_s, _, end_s = range_header[6:].partition("-")
            start = int(start_s or 0)
            end = int(end_s) if end_s else len(data) - 1
            headers["Content-Range"] = f"bytes {start}-{end}/{len(data)}"
            data, status = data[start : end + 1], 206
        headers["Content-Type"] = "application/octet-stream"
        if head:
            self.send_response(status)
            for k, v in headers.items():
                self.send_header(k, v)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
        else:
            self._send(status, data, headers)


def _endpoint_name(method: str, path: str) -> str:
    """A stable name for fault injection: create, validate, preupload, lfs-batch, lfs-upload, commit, ..."""
    parts = path.strip("/").split("/")
    if path == "/api/repos/create":
        return "create"
    if path == "/api/validate-yaml":
        return "validate"
    if parts[0] == "_lfs":
        return "lfs-upload"
    if path.endswith("/info/lfs/objects/batch"):
        return "lfs-batch"
    if parts[0] == "api" and len(parts) >= 2 and parts[1] in ("models", "datasets", "spaces"):
        return parts[4] if len(parts) >= 5 and parts[4] != "revision" else "info"
    if parts[0] in ("datasets", "spaces"):
        parts = parts[1:]
    if len(parts) >= 3 and parts[2] == "resolve":
        return f"resolve-{method.lower()}"
    return "other"


class LocalHubServer(ThreadingHTTPServer):
    """``with LocalHubServer(token=...) as hub: ... hub.url ...`` serves on 127.0.0.1 at a free port."""

    daemon_threads = True

    def __init__(self, token: str | None = None, storage_dir: str | Path | None = None) -> None:
        super().__init__(("127.0.0.1", 0), HubRequestHandler)
        self.token = token
        self.state = HubState(Path(storage_dir) if storage_dir else None)
        self.url = f"http://127.0.0.1:{self.server_address[1]}"
        self.request_log: list[str] = []
        self.attempts: list[str] = []  # endpoint of every request received
        self.calls: list[str] = []  # endpoints that did their work (not failed by an injected fault)
        self._faults: dict[str, list[Fault]] = {}
        self._fault_lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def fail_next(self, endpoint: str, mode: str = "error", status: int = 500, times: int = 1) -> None:
        """Queue a fault for the next ``times`` requests to ``endpoint`` (after faults queued before it)."""
        with self._fault_lock:
            self._faults.setdefault(endpoint, []).append(Fault(mode, status, times))

    def take_fault(self, endpoint: str) -> Fault | None:
        with self._fault_lock:
            queue = self._faults.get(endpoint)
            if not queue:
                return None
            fault = queue[0]
            fault.times -= 1
            if fault.times <= 0:
                queue.pop(0)
            return fault

    def start(self) -> LocalHubServer:
        self._thread = threading.Thread(target=self.serve_forever, name="local-hub", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self.shutdown()
        self.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def __enter__(self) -> LocalHubServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


if __name__ == "__main__":  # manual use: python tests/hub_server.py
    with LocalHubServer() as hub:
        print(f"serving a local Hub at {hub.url} (Ctrl-C to stop)")
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            pass
