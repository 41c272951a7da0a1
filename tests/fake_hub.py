"""A stand-in for the Hugging Face hub, for the internet this machine does not have.

It answers the few HTTP routes huggingface_hub (and datasets through it) uses to resolve a revision, list a
commit's files and download one (`/api/models/{repo}[/revision/{rev}]`, `/api/models/{repo}/tree/{rev}[/{dir}]`,
`/{repo}/resolve/{rev}/{path}`, and the same under `datasets/` for dataset repositories), with
the headers and error codes the hub sends, from repositories held in memory. Point HF_ENDPOINT at `endpoint`.
Every request is recorded, so a test can say what was downloaded.
"""
from __future__ import annotations

import hashlib
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlparse


class FakeHub:
    def __init__(self) -> None:
        self.repos: dict[str, dict] = {}
        self.requests: list[tuple[str, str]] = []
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def publish(self, repo_id: str, files: dict[str, bytes], branch: str = "main", gated: bool = False,
                claimed_sizes: dict[str, int] | None = None) -> str:
        """A new commit of `repo_id` holding `files`, at the head of `branch`; returns its hash. `claimed_sizes`:
        sizes the file listing states instead of the real ones."""
        digest = hashlib.sha1(repo_id.encode())
        for name in sorted(files):
            digest.update(name.encode() + hashlib.sha256(files[name]).digest())
        commit = digest.hexdigest()
        repo = self.repos.setdefault(repo_id, {"refs": {}, "commits": {}, "gated": gated, "sizes": {}})
        repo["commits"][commit] = dict(files)
        repo["refs"][branch] = commit
        repo["sizes"][commit] = claimed_sizes or {}
        return commit

    def downloaded(self, repo_id: str) -> set[str]:
        """Paths of `repo_id` whose bytes were sent (GET of a file; HEAD requests only ask for metadata). A dataset
        repository's id is `datasets/owner/name`, here and in `publish`."""
        prefix = f"/{repo_id}/resolve/"
        return {unquote(path[len(prefix):]).split("/", 1)[1] for method, path in self.requests
                if method == "GET" and path.startswith(prefix)}

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def _handler(hub: FakeHub) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args) -> None:
            pass

        def send(self, code: int, body: bytes = b"", headers: tuple = ()) -> None:
            self.send_response(code)
            for key, value in headers:
                self.send_header(key, value)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        def error(self, code: int, error_code: str) -> None:
            self.send(code, json.dumps({"error": error_code}).encode(), (("X-Error-Code", error_code),))

        def route(self) -> None:
            hub.requests.append((self.command, self.path))
            url = urlparse(self.path)
            parts = [unquote(p) for p in url.path.strip("/").split("/")]
            api = parts[0] == "api" and parts[1:2] in (["models"], ["datasets"])
            kind = parts[1] if api else "datasets" if parts[0] == "datasets" else "models"
            if api:
                parts = ["api", "models"] + parts[2:] + (["revision", "main"] if len(parts) == 4 else [])
            elif kind == "datasets":
                parts = parts[1:]
            repo_id = ("datasets/" if kind == "datasets" else "") + "/".join(parts[2:4] if api else parts[:2])
            repo = hub.repos.get(repo_id)
            if repo is None or not (api and len(parts) >= 6 or len(parts) >= 5 and parts[2] == "resolve"):
                return self.error(404 if repo is None else 400, "RepoNotFound")
            if repo["gated"] and "Authorization" not in self.headers:
                return self.error(401, "GatedRepo")
            revision = parts[5] if api else parts[3]
            commit = repo["refs"].get(revision, revision)
            files = repo["commits"].get(commit)
            if files is None:
                return self.error(404, "RevisionNotFound")
            if api and parts[4] == "revision":
                body = {"id": repo_id, "sha": commit, "siblings": [{"rfilename": p} for p in files]}
                return self.send(200, json.dumps(body).encode())
            if api and parts[4] == "tree":
                recursive = parse_qs(url.query).get("recursive", ["false"])[0].lower() == "true"
                sub = "/".join(parts[6:])
                listing = _tree(files, repo["sizes"][commit], recursive, sub)
                if sub and not listing:
                    return self.error(404, "EntryNotFound")
                return self.send(200, json.dumps(listing).encode())
            path = "/".join(parts[4:])
            if path not in files:
                return self.error(404, "EntryNotFound")
            data = files[path]
            return self.send(200, data, (("X-Repo-Commit", commit),
                                         ("ETag", f'"{hashlib.sha256(data).hexdigest()}"')))

        do_GET = do_HEAD = route

    return Handler


def _tree(files: dict[str, bytes], sizes: dict[str, int], recursive: bool, sub: str = "") -> list[dict]:
    """The listing of folder `sub` (the top when empty), as the hub's tree route gives it."""
    out, dirs = [], set()
    prefix = f"{sub}/" if sub else ""
    for path, data in sorted(files.items()):
        if not path.startswith(prefix):
            continue
        rest = path[len(prefix):]
        if "/" in rest and not recursive:
            top = prefix + rest.split("/")[0]
            if top not in dirs:
                dirs.add(top)
                out.append({"type": "directory", "oid": "0" * 40, "size": 0, "path": top})
            continue
        size = sizes.get(path, len(data))
        out.append({"type": "file", "oid": hashlib.sha1(data).hexdigest(), "size": size, "path": path,
                    "lfs": {"oid": hashlib.sha256(data).hexdigest(), "size": size, "pointerSize": 134}})
    return out
