"""A small fake Hugging Face Hub HTTP server, for tests that upload with the real `huggingface_hub` client.

It answers just what `create_repo(...)` and `upload_folder(...)` request (repo types "model", "dataset",
"space"), on 127.0.0.1 only:

    POST /api/repos/create                               create a repo (409 if it exists, as the Hub does)
    GET  /api/{type}s/{repo_id}[/revision/{rev}]         repo info (id, sha, private, siblings)
    GET  /api/{type}s/{repo_id}/refs                     branches
    GET  /api/{type}s/{repo_id}/tree/{rev}[/{path}]      list_repo_tree / list_repo_files (one page; what
                                                         upload_folder(delete_patterns=...) reads)
    POST /api/{type}s/{repo_id}/branch/{branch}          create a branch (409 if it exists)
    POST /api/{type}s/{repo_id}/preupload/{rev}          always answers uploadMode "regular": no LFS, no Xet
    POST /api/{type}s/{repo_id}/commit/{rev}             NDJSON commit, file bytes base64-encoded inline;
                                                         deletedFile / deletedFolder lines remove paths
    POST /api/spaces/{repo_id}/variables                 add_space_variable (kept in `space_variables`)
    GET  /api/whoami-v2                                  the fake user
    POST /api/validate-yaml                              README.md metadata check: always valid
    GET  /api/agent-harnesses                            huggingface_hub's agent registry (once a process): empty

Because every file is "regular", all bytes arrive inside the commit payload, so the client never starts
an LFS or Xet transfer (which would need more servers). Anything else is recorded in `unknown_requests`
and answered 404 with a JSON error. Write calls without an `Authorization: Bearer ...` header get 401,
and a commit to a branch that does not exist gets 404 RevisionNotFound, as on the real Hub.

Pointing the client at the server:

* in-process: `huggingface_hub.constants.ENDPOINT` is read from HF_ENDPOINT once, at import; and the
  module-level functions `huggingface_hub.create_repo`, `upload_folder`, ... are methods of one
  `HfApi()` created at import (`huggingface_hub.hf_api.api`), which copied the endpoint then. Both need
  patching: `hub.point_huggingface_hub_here(monkeypatch)` does it (and sets HF_ENDPOINT for children).
* subprocess: put `HF_ENDPOINT=hub.url` in the child's environment (`hub.subprocess_env(...)`), and do
  not set HF_HUB_OFFLINE=1 there: offline mode blocks every request, this server's included.

    with FakeHub() as hub:
        hub.point_huggingface_hub_here(monkeypatch)
        ...upload...
        assert hub.files("fake-user/model")["config.json"] == b"{}"
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit

import pytest

# Either one turns huggingface_hub's offline mode on, which blocks requests to this server too.
OFFLINE_VARIABLES = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")


def without_offline_variables(env: dict[str, str]) -> dict[str, str]:
    """`env` with huggingface_hub's offline switches removed, for a child that must reach this server."""
    return {name: value for name, value in env.items() if name not in OFFLINE_VARIABLES}


REPO_TYPE_OF_PREFIX = {"models": "model", "datasets": "dataset", "spaces": "space"}
URL_PREFIX_OF_TYPE = {"model": "", "dataset": "datasets/", "space": "spaces/"}

# /api/{type}s/{repo_id}/{action}[/{rest}], matched on the still-quoted path (revisions come quoted, "/" as %2F).
_REPO_ROUTE = re.compile(
    r"^/api/(?P<prefix>models|datasets|spaces)/(?P<repo_id>[^/]+(?:/[^/]+)??)"
    r"(?:/(?P<action>preupload|commit|branch|revision|refs|variables|tree)(?:/(?P<rest>.+))?)?/?$"
)


def delete_path(tree: dict[str, bytes], path: str) -> None:
    """Remove a file, or a whole folder, from a {path: bytes} tree."""
    folder = path.rstrip("/") + "/"
    for existing in [p for p in tree if p == path or p.startswith(folder)]:
        del tree[existing]


def git_blob_sha1(data: bytes) -> str:
    """The git object id of a file's content (what the Hub reports as a regular file's oid)."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


class HubError(Exception):
    """Raised by a route to answer an HTTP error with a JSON body (and the Hub's X-Error-Code header)."""

    def __init__(self, status: int, message: str, error_code: str | None = None, **extra):
        super().__init__(message)
        self.status, self.message, self.error_code, self.extra = status, message, error_code, extra


class FakeHub:
    """A fake Hub on http://127.0.0.1:PORT; a context manager that serves from a daemon thread.

    What it saw is kept in plain attributes for assertions:
      repos                  repo_id -> {"type": ..., "private": ...} (spaces also carry "sdk")
      commits                list of {"repo_id", "repo_type", "revision", "message", "description",
                             "files": {path: bytes}, "deleted": [path, ...], "oid"}
      authorization_headers  every Authorization header value received, in order
      requests               every (method, path) received, in order (path without the query string)
      unknown_requests       the (method, path) pairs that matched no route (answered 404)
    """

    def __init__(self, user: str = "fake-user", fail_with: int | None = None, fail_on: str = "commit"):
        self.user = user
        self.repos: dict[str, dict] = {}
        self.commits: list[dict] = []
        self.authorization_headers: list[str] = []
        self.requests: list[tuple[str, str]] = []
        self.unknown_requests: list[tuple[str, str]] = []
        self.space_variables: dict[str, dict[str, str]] = {}  # space repo_id -> {key: value}
        self._branches: dict[str, dict[str, dict[str, bytes]]] = {}  # repo_id -> branch -> {path: bytes}
        self._heads: dict[tuple[str, str], str] = {}  # (repo_id, branch) -> commit oid
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self.fail_with(fail_with, fail_on)

    # ------------------------------------------------------------------ lifecycle

    @property
    def url(self) -> str:
        """Base URL, "http://127.0.0.1:PORT" (what HF_ENDPOINT should be)."""
        if self._server is None:
            raise RuntimeError("FakeHub is not running: use it as a context manager")
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def __enter__(self) -> "FakeHub":
        handler = type("FakeHubHandler", (_Handler,), {"hub": self})
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self._server.daemon_threads = True
        # A short poll interval makes shutdown() quick (the default, 0.5 s, would slow every test down).
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.05,), name="fake-hub",
                                        daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    # ------------------------------------------------------------------ test controls

    def fail_with(self, status: int | None, on: str = "commit") -> None:
        """Answer every later `on` request ("commit", "preupload", "create", "branch", "variables") with HTTP
        `status`, echoing the request's Authorization header in the error message and body.

        `None` turns failures off. A 4xx fails the client at once; huggingface_hub may retry 429 and 5xx
        answers with a backoff of tens of seconds (how, depends on its version), so tests use a 4xx.
        """
        self._fail_status, self._fail_on = status, on

    def point_huggingface_hub_here(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """Make this process's huggingface_hub (and subprocesses inheriting os.environ) talk to this server."""
        import huggingface_hub.constants
        import huggingface_hub.hf_api

        monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", self.url)
        # `huggingface_hub.create_repo` & co. are bound methods of this instance, which copied the endpoint.
        monkeypatch.setattr(huggingface_hub.hf_api.api, "endpoint", self.url)
        monkeypatch.setenv("HF_ENDPOINT", self.url)
        # A user's HF_HUB_OFFLINE=1 (read once, at import) would block every request, this server's included.
        monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
        for name in OFFLINE_VARIABLES:
            monkeypatch.delenv(name, raising=False)

    def subprocess_env(self, base: dict[str, str] | None = None, **extra: str) -> dict[str, str]:
        """An environment for a child process that uses this server (online, telemetry off)."""
        env = without_offline_variables(os.environ if base is None else base)
        env.update(HF_ENDPOINT=self.url, HF_HUB_DISABLE_TELEMETRY="1", **extra)
        return env

    def files(self, repo_id: str, revision: str | None = None) -> dict[str, bytes]:
        """All files committed to `repo_id` (on `revision` only, if given): commits replayed in order."""
        result: dict[str, bytes] = {}
        with self._lock:
            for commit in self.commits:
                if commit["repo_id"] != repo_id or revision not in (None, commit["revision"]):
                    continue
                for path in commit["deleted"]:
                    delete_path(result, path)
                result.update(commit["files"])
        return result

    # ------------------------------------------------------------------ routes (called with the lock held)

    def _repo(self, repo_type: str, repo_id: str) -> dict:
        repo = self.repos.get(repo_id)
        if repo is None or repo["type"] != repo_type:
            raise HubError(404, f"Repository Not Found for url: {repo_type} {repo_id}", "RepoNotFound")
        return repo

    def _tree(self, repo_id: str, revision: str) -> dict[str, bytes]:
        tree = self._branches[repo_id].get(revision)
        if tree is None:
            raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        return tree

    def _repo_url(self, repo_type: str, repo_id: str) -> str:
        return f"{self.url}/{URL_PREFIX_OF_TYPE[repo_type]}{repo_id}"

    def create_repo(self, body: dict) -> tuple[int, dict]:
        repo_type = body.get("type") or "model"
        repo_id = f"{body.get('organization') or self.user}/{body['name']}"
        url = self._repo_url(repo_type, repo_id)
        if repo_id in self.repos:
            # create_repo(exist_ok=True) reads the URL from this 409 answer, as the Hub sends it.
            raise HubError(409, f"You already created this {repo_type} repo", url=url)
        repo = {"type": repo_type, "private": bool(body.get("private")) or body.get("visibility") == "private"}
        if repo_type == "space":
            repo["sdk"] = body.get("sdk")
        self.repos[repo_id] = repo
        self._branches[repo_id] = {"main": {}}
        self._heads[(repo_id, "main")] = hashlib.sha1(repo_id.encode()).hexdigest()
        return 200, {"url": url, "name": repo_id, "id": repo_id}

    def repo_info(self, repo_type: str, repo_id: str, revision: str) -> tuple[int, dict]:
        repo = self._repo(repo_type, repo_id)
        tree = self._tree(repo_id, revision)
        info = {"id": repo_id, "author": repo_id.split("/")[0], "sha": self._heads[(repo_id, revision)],
                "private": repo["private"], "siblings": [{"rfilename": path} for path in sorted(tree)]}
        if repo_type == "space":
            info["sdk"] = repo.get("sdk")
        return 200, info

    def refs(self, repo_type: str, repo_id: str) -> tuple[int, dict]:
        self._repo(repo_type, repo_id)
        branches = [{"name": name, "ref": f"refs/heads/{name}", "targetCommit": self._heads[(repo_id, name)]}
                    for name in self._branches[repo_id]]
        return 200, {"branches": branches, "converts": [], "tags": [], "pullRequests": []}

    def tree(self, repo_type: str, repo_id: str, revision: str, folder: str, recursive: bool) -> tuple[int, list]:
        """The files and folders under `folder` (all of them when `recursive`), as the Hub's tree API lists them."""
        self._repo(repo_type, repo_id)
        tree = self._tree(repo_id, revision)
        prefix = folder.strip("/") + "/" if folder.strip("/") else ""
        paths = [path for path in tree if path.startswith(prefix)]
        if prefix and not paths:
            raise HubError(404, f"{folder} does not exist on {revision}", "EntryNotFound")
        entries: dict[str, dict] = {}
        for path in paths:
            parts = path[len(prefix):].split("/")
            for level in range(1, (len(parts) if recursive else 1) + 1):
                entry = prefix + "/".join(parts[:level])
                if level == len(parts):
                    entries[entry] = {"type": "file", "path": entry, "size": len(tree[path]),
                                      "oid": git_blob_sha1(tree[path])}
                else:
                    entries[entry] = {"type": "directory", "path": entry, "oid": git_blob_sha1(entry.encode())}
        return 200, [entries[path] for path in sorted(entries)]

    def create_branch(self, repo_type: str, repo_id: str, branch: str, body: dict) -> tuple[int, dict]:
        self._repo(repo_type, repo_id)
        if branch in self._branches[repo_id]:
            raise HubError(409, f"Reference already exists: refs/heads/{branch}")
        start = body.get("startingPoint") or "main"
        self._branches[repo_id][branch] = dict(self._tree(repo_id, start))
        self._heads[(repo_id, branch)] = self._heads[(repo_id, start)]
        return 200, {}

    def preupload(self, repo_type: str, repo_id: str, revision: str, body: dict) -> tuple[int, dict]:
        self._repo(repo_type, repo_id)
        tree = self._tree(repo_id, revision)
        files = [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False,
                  "oid": git_blob_sha1(tree[f["path"]]) if f["path"] in tree else None}
                 for f in body["files"]]
        return 200, {"files": files, "commitOid": self._heads[(repo_id, revision)]}

    def commit(self, repo_type: str, repo_id: str, revision: str, ndjson: bytes) -> tuple[int, dict]:
        self._repo(repo_type, repo_id)
        tree = self._tree(repo_id, revision)
        lines = [json.loads(line) for line in ndjson.splitlines() if line.strip()]
        header = next((line["value"] for line in lines if line["key"] == "header"), None)
        if header is None:
            raise HubError(400, "commit payload has no header line")
        files: dict[str, bytes] = {}
        deleted: list[str] = []
        for line in lines:
            key, value = line["key"], line["value"]
            if key == "file":
                if value.get("encoding") != "base64":
                    raise HubError(400, f"fake hub only takes base64 files, got {value.get('encoding')!r}")
                files[value["path"]] = base64.b64decode(value["content"])
            elif key in ("deletedFile", "deletedFolder"):
                deleted.append(value["path"])
            elif key != "header":  # e.g. "lfsFile": this fake never asks for LFS, so it can't resolve it
                raise HubError(400, f"fake hub does not support {key!r} commit lines")
        for path in deleted:
            delete_path(tree, path)
        tree.update(files)
        oid = hashlib.sha1(f"{len(self.commits)}:{repo_id}:{revision}".encode()).hexdigest()
        self._heads[(repo_id, revision)] = oid
        self.commits.append({"repo_id": repo_id, "repo_type": repo_type, "revision": revision,
                             "message": header.get("summary"), "description": header.get("description"),
                             "files": files, "deleted": deleted, "oid": oid})
        return 200, {"success": True, "commitOid": oid,
                     "commitUrl": f"{self._repo_url(repo_type, repo_id)}/commit/{oid}"}

    def dispatch(self, method: str, raw_path: str, query: dict, headers, body: bytes) -> tuple[int, dict]:
        """Route one request; returns (status, JSON body) or raises HubError."""
        match = _REPO_ROUTE.match(raw_path)
        if method == "POST" and raw_path == "/api/repos/create":
            route, args = "create", ()
        elif method == "GET" and raw_path == "/api/whoami-v2":
            route, args = "whoami", ()
        elif method == "POST" and raw_path == "/api/validate-yaml":
            route, args = "validate-yaml", ()
        elif method == "GET" and raw_path == "/api/agent-harnesses":
            route, args = "agent-harnesses", ()
        elif match:
            action, rest = match["action"], unquote(match["rest"] or "")
            route = {("GET", None): "info", ("GET", "revision"): "info", ("GET", "refs"): "refs",
                     ("POST", "branch"): "branch", ("POST", "preupload"): "preupload",
                     ("POST", "commit"): "commit", ("POST", "variables"): "variables",
                     ("GET", "tree"): "tree"}.get((method, action), "unknown")
            if action is None:
                rest = "main"  # repo info without a revision: the default branch
            if bool(rest) != (route not in ("refs", "variables")):  # the others need a revision / branch name
                route = "unknown"
            args = (REPO_TYPE_OF_PREFIX[match["prefix"]], unquote(match["repo_id"]), rest)
        else:
            route, args = "unknown", ()

        if route == "unknown":
            self.unknown_requests.append((method, raw_path))
            raise HubError(404, f"fake hub: no route for {method} {raw_path}")
        auth = headers.get("Authorization") or ""
        if route in ("create", "branch", "preupload", "commit", "whoami", "variables") and not auth.startswith("Bearer "):
            raise HubError(401, "Invalid username or password.")
        if self._fail_status is not None and route == self._fail_on:
            # Echo the credentials, as a misconfigured proxy or a verbose server error can: callers must mask them.
            raise HubError(self._fail_status, f"fake hub: {route} failing on purpose with {self._fail_status} "
                                              f"(request had Authorization: {auth})")

        if route == "create":
            return self.create_repo(json.loads(body))
        if route == "whoami":
            return 200, {"type": "user", "name": self.user, "auth": {"type": "access_token"}}
        if route == "validate-yaml":  # sent before any upload that includes a README.md: accept everything
            return 200, {"errors": [], "warnings": []}
        if route == "agent-harnesses":  # fetched by a process's first request (its user agent): no harness
            return 200, {"standardEnvVars": [], "harnesses": {}}
        repo_type, repo_id, rest = args
        if route == "info":
            return self.repo_info(repo_type, repo_id, rest)
        if route == "refs":
            return self.refs(repo_type, repo_id)
        if route == "tree":  # {rev}[/{path}]: the revision comes quoted ("/" as %2F), so split before unquoting
            revision, _, folder = match["rest"].partition("/")
            recursive = (query.get("recursive") or ["false"])[0].lower() == "true"
            return self.tree(repo_type, repo_id, unquote(revision), unquote(folder), recursive)
        if route == "variables":  # add_space_variable: {"key", "value"[, "description"]}
            self._repo(repo_type, repo_id)
            variable = json.loads(body)
            variables = self.space_variables.setdefault(repo_id, {})
            variables[variable["key"]] = variable["value"]
            return 200, {key: {"value": value} for key, value in variables.items()}
        if route == "branch":
            return self.create_branch(repo_type, repo_id, rest, json.loads(body or b"{}"))
        if route == "preupload":
            return self.preupload(repo_type, repo_id, rest, json.loads(body))
        if "create_pr" in query:
            raise HubError(400, "fake hub does not support create_pr")
        return self.commit(repo_type, repo_id, rest, body)


class _Handler(BaseHTTPRequestHandler):
    """HTTP/1.0 handler (one request per connection: nothing lingers after shutdown)."""

    hub: FakeHub  # set on the subclass made in FakeHub.__enter__

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while size := int(self.rfile.readline().split(b";")[0].strip() or b"0", 16):
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
            self.rfile.readline()
            return b"".join(chunks)
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _handle(self) -> None:
        split = urlsplit(self.path)
        body = self._read_body()
        hub = self.hub
        with hub._lock:
            hub.requests.append((self.command, split.path))
            if "Authorization" in self.headers:
                hub.authorization_headers.append(self.headers["Authorization"])
            try:
                status, payload = hub.dispatch(self.command, split.path, parse_qs(split.query), self.headers, body)
                extra_headers = {}
            except HubError as error:
                status, payload = error.status, {"error": error.message, **error.extra}
                extra_headers = {"X-Error-Message": error.message}
                if error.error_code:
                    extra_headers["X-Error-Code"] = error.error_code
            except Exception as error:  # a bug in the fake or a malformed request: say so, don't hang
                status, payload = 500, {"error": f"fake hub crashed: {type(error).__name__}: {error}"}
                extra_headers = {}
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for key, value in extra_headers.items():
            self.send_header(key, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    do_GET = do_POST = do_PUT = do_DELETE = do_HEAD = do_PATCH = _handle

    def log_message(self, format, *args) -> None:  # keep pytest output clean
        pass


@pytest.fixture
def fake_hub(monkeypatch):
    """A running FakeHub that this process's huggingface_hub already talks to (HF_ENDPOINT is set too)."""
    with FakeHub() as hub:
        hub.point_huggingface_hub_here(monkeypatch)
        yield hub
