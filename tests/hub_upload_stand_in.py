"""A loopback stand-in for the Hub endpoints that `HfApi.create_repo` and `HfApi.upload_folder` call.

olah serves repositories but accepts no uploads, so the publishing tests send their upload here. Each commit is
written into a git repository under olah's mirrors path, from where olah serves it like any other repository.

Endpoints, as huggingface_hub 2.4 calls them (any other path returns 404):
- `POST /api/repos/create`: create a bare repository with an empty first commit on `main` (409 if it exists).
- `POST /api/models/<org>/<name>/branch/<branch>`: create a branch from `main` (409 if it exists).
- `POST /api/validate-yaml`: check that the card's front matter parses as YAML.
- `POST /api/models/<org>/<name>/preupload/<revision>`: answer "regular" for every file, so file contents arrive
  inline (base64) in the commit instead of through the LFS upload the real Hub uses for large files.
- `POST /api/models/<org>/<name>/commit/<revision>`: apply the NDJSON commit and return its sha.

Every request needs `Authorization: Bearer <token>` with the stand-in's token (401 otherwise), and repositories
may only be written in the namespaces it allows (403 otherwise).
"""

from __future__ import annotations

import base64
import json
import re
import shutil
import tempfile
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import yaml
from hub_testing import git


REPO_PATH = re.compile(
    r"^/api/models/(?P<org>[\w.-]+)/(?P<name>[\w.-]+)/(?P<action>preupload|commit|branch)/(?P<rev>.+)$"
)


class HubUploadStandIn:
    """Serve the upload endpoints on 127.0.0.1 in a background thread; commits go to `mirrors_path/models/<id>`."""

    def __init__(self, mirrors_path: Path, token: str, namespaces: tuple[str, ...]):
        self.mirrors_path = mirrors_path
        self.token = token
        self.namespaces = namespaces
        self.requests: list[tuple[str, str, bytes]] = []
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler_class())
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def __enter__(self) -> HubUploadStandIn:
        self._thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=10)

    def repo_path(self, repo_id: str) -> Path:
        return self.mirrors_path / "models" / repo_id

    def _handler_class(self):
        stand_in = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format, *args):  # keep pytest output clean; requests are recorded instead
                pass

            def do_GET(self):
                stand_in.requests.append(("GET", self.path, b""))
                self.reply(404, {"error": f"{self.path} is not served by the upload stand-in."})

            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                stand_in.requests.append(("POST", self.path, body))
                if self.headers.get("Authorization") != f"Bearer {stand_in.token}":
                    self.reply(401, {"error": "Invalid credentials in Authorization header"})
                    return
                with stand_in._lock:
                    status, payload, error_code = stand_in.handle_post(self.path.split("?")[0], body)
                self.reply(status, payload, error_code)

            def reply(self, status: int, payload: dict, error_code: str | None = None):
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                if error_code:
                    self.send_header("X-Error-Code", error_code)
                if status >= 400 and "error" in payload:
                    self.send_header("X-Error-Message", payload["error"])
                self.end_headers()
                self.wfile.write(data)

        return Handler

    def handle_post(self, path: str, body: bytes) -> tuple[int, dict, str | None]:
        """Apply one POST request; return the status, the JSON reply and the `X-Error-Code` header, if any."""
        if path == "/api/repos/create":
            request = json.loads(body)
            return self.create_repo(f"{request.get('organization')}/{request['name']}")
        if path == "/api/validate-yaml":
            return self.validate_yaml(json.loads(body)["content"])
        match = REPO_PATH.match(path)
        if match is None:
            return 404, {"error": f"{path} is not served by the upload stand-in."}, None

        repo_id = f"{match['org']}/{match['name']}"
        repo = self.repo_path(repo_id)
        if not repo.is_dir():
            return 404, {"error": "Repository not found"}, "RepoNotFound"
        if match["org"] not in self.namespaces:
            return 403, {"error": f"You have no write access to {repo_id}"}, None
        if match["action"] == "branch":
            return self.create_branch(repo, match["rev"])
        if match["action"] == "preupload":
            files = json.loads(body)["files"]
            return (
                200,
                {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in files]},
                None,
            )
        return self.commit(repo, repo_id, match["rev"], body)

    def create_repo(self, repo_id: str) -> tuple[int, dict, str | None]:
        if repo_id.split("/")[0] not in self.namespaces:
            return 403, {"error": f"You have no rights to create a model under {repo_id.split('/')[0]}"}, None
        repo = self.repo_path(repo_id)
        url = f"{self.endpoint}/{repo_id}"
        if repo.exists():
            return 409, {"error": "You already created this model repo", "url": url}, None
        # A bare repository, so that commits to any branch can be made in worktrees of their own.
        repo.mkdir(parents=True)
        git(repo, "init", "--quiet", "--bare", "--initial-branch", "main")
        empty_tree = git(repo, "hash-object", "-w", "-t", "tree", "/dev/null")
        first_commit = git(repo, "commit-tree", empty_tree, "-m", "initial commit")
        git(repo, "update-ref", "refs/heads/main", first_commit)
        return 200, {"url": url}, None

    def create_branch(self, repo: Path, branch: str) -> tuple[int, dict, str | None]:
        if branch in git(repo, "branch", "--format=%(refname:short)").split():
            return 409, {"error": f"Branch {branch} already exists"}, None
        git(repo, "branch", branch, "main")
        return 200, {}, None

    def validate_yaml(self, content: str) -> tuple[int, dict, str | None]:
        front_matter = re.match(r"^---\n(.*?)\n---\n", content, flags=re.S)
        if front_matter is None:
            return 400, {"errors": [{"message": "README.md has no YAML front matter"}], "warnings": []}, None
        try:
            yaml.safe_load(front_matter.group(1))
        except yaml.YAMLError as error:
            return 400, {"errors": [{"message": f"Invalid YAML: {error}"}], "warnings": []}, None
        return 200, {"errors": [], "warnings": []}, None

    def commit(self, repo: Path, repo_id: str, revision: str, body: bytes) -> tuple[int, dict, str | None]:
        """Apply the NDJSON commit (header, then `file` and `deletedFile` lines) on branch `revision`."""
        lines = [json.loads(line) for line in body.splitlines() if line.strip()]
        header = next(line["value"] for line in lines if line["key"] == "header")
        if any(line["key"] == "lfsFile" for line in lines):
            return 400, {"error": "The upload stand-in accepts regular files only, not LFS pointers"}, None
        if revision not in git(repo, "branch", "--format=%(refname:short)").split():
            return 404, {"error": f"Invalid rev id: {revision}"}, "RevisionNotFound"

        worktree = Path(tempfile.mkdtemp(prefix="upload-stand-in-"))
        shutil.rmtree(worktree)
        git(repo, "worktree", "add", "--quiet", str(worktree), revision)
        try:
            for line in lines:
                value = line["value"]
                target = worktree / value.get("path", "")
                if line["key"] == "file":
                    target.parent.mkdir(parents=True, exist_ok=True)
                    target.write_bytes(base64.b64decode(value["content"]))
                elif line["key"] == "deletedFile":
                    target.unlink()
            git(worktree, "add", "--all")
            message = header["summary"] + (f"\n\n{header['description']}" if header.get("description") else "")
            git(worktree, "commit", "--quiet", "--allow-empty", "--message", message)
            sha = git(worktree, "rev-parse", "HEAD")
        finally:
            git(repo, "worktree", "remove", "--force", str(worktree))
        return 200, {"commitUrl": f"{self.endpoint}/{repo_id}/commit/{sha}", "commitOid": sha}, None
