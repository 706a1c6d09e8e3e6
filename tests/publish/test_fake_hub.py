"""The fake Hub (tests/fake_hub.py) against the real huggingface_hub client: in-process and in a subprocess."""

from __future__ import annotations

import random
import subprocess
import sys
import textwrap
from pathlib import Path

import huggingface_hub
import huggingface_hub.constants
import pytest
from huggingface_hub.errors import HfHubHTTPError, RevisionNotFoundError

from fake_hub import FakeHub

TOKEN = "hf_fake_token_0123456789"
IGNORE_PATTERNS = ["logs/**", "*.tmp"]


def make_folder(root: Path) -> dict[str, bytes]:
    """A folder to upload; returns what the Hub should end up with (ignored files left out)."""
    expected = {
        "README.md": "# Tiny model\n\nÜnïcödé text.\n".encode(),
        "model_index.json": b'{"_class_name": "DDPMPipeline"}\n',
        "unet/diffusion_pytorch_model.safetensors": random.Random(0).randbytes(300 * 1024),
        "unet/nested/deeper/config.json": b'{"sample_size": 16}',
        "empty.txt": b"",
    }
    ignored = {"logs/events.out": b"log", "scratch.tmp": b"tmp"}
    for relative, data in {**expected, **ignored}.items():
        (root / relative).parent.mkdir(parents=True, exist_ok=True)
        (root / relative).write_bytes(data)
    return expected


def assert_only_hub_traffic(hub: FakeHub) -> None:
    """No LFS batch, no Xet token call, nothing the fake did not expect."""
    assert hub.unknown_requests == []
    assert {method for method, _ in hub.requests} <= {"GET", "POST"}
    assert not any("lfs" in path or "xet" in path for _, path in hub.requests), hub.requests


@pytest.fixture(params=["xet-pipeline", "legacy-create-commit"])
def upload_path(request, monkeypatch):
    """upload_folder takes a streamed pipeline when hf_xet is installed, else create_commit: test both."""
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_DISABLE_XET", request.param == "legacy-create-commit")
    return request.param


def test_pointing_the_client_here_reaches_module_functions_and_new_clients(fake_hub):
    """`huggingface_hub.create_repo` & co. and a fresh `HfApi()` both talk to the fake, whatever the user set."""
    repo = huggingface_hub.create_repo("me/demo", token=TOKEN, exist_ok=True)
    assert repo.endpoint == fake_hub.url and huggingface_hub.HfApi().endpoint == fake_hub.url
    huggingface_hub.HfApi(token=TOKEN).create_repo("me/other", exist_ok=True)
    assert fake_hub.repos == {"me/demo": {"type": "model", "private": False},
                              "me/other": {"type": "model", "private": False}}


def test_model_upload(tmp_path, monkeypatch, upload_path):
    expected = make_folder(tmp_path / "folder")
    with FakeHub() as hub:
        hub.point_huggingface_hub_here(monkeypatch)
        repo = huggingface_hub.create_repo("me/tiny-ddpm", token=TOKEN, private=True, exist_ok=True,
                                           repo_type="model")
        again = huggingface_hub.create_repo("me/tiny-ddpm", token=TOKEN, private=True, exist_ok=True)
        commit = huggingface_hub.upload_folder(repo_id=repo.repo_id, folder_path=tmp_path / "folder", token=TOKEN,
                                               commit_message="Upload DDPM pipeline", repo_type="model",
                                               ignore_patterns=IGNORE_PATTERNS)

        assert repo.repo_id == again.repo_id == "me/tiny-ddpm" and repo.repo_type == "model"
        assert hub.repos == {"me/tiny-ddpm": {"type": "model", "private": True}}
        assert hub.files("me/tiny-ddpm") == expected  # same paths, same bytes, ignored files absent
        [record] = hub.commits
        assert (record["repo_type"], record["revision"], record["message"]) == ("model", "main",
                                                                              "Upload DDPM pipeline")
        assert commit.commit_url == f"{hub.url}/me/tiny-ddpm/commit/{record['oid']}"
        assert commit.oid == record["oid"]
        assert hub.authorization_headers and set(hub.authorization_headers) == {f"Bearer {TOKEN}"}
        assert_only_hub_traffic(hub)

        # A second upload sends only what changed: the preupload call reports the remote oids.
        (tmp_path / "folder" / "README.md").write_text("changed\n")
        huggingface_hub.upload_folder(repo_id="me/tiny-ddpm", folder_path=tmp_path / "folder", token=TOKEN,
                                      ignore_patterns=IGNORE_PATTERNS)
        assert list(hub.commits[-1]["files"]) == ["README.md"]
        assert hub.files("me/tiny-ddpm") == {**expected, "README.md": b"changed\n"}
        assert_only_hub_traffic(hub)


def test_space_upload(tmp_path, fake_hub, upload_path):
    expected = make_folder(tmp_path / "folder")
    repo = huggingface_hub.create_repo("me/demo-space", token=TOKEN, private=False, exist_ok=True,
                                       repo_type="space", space_sdk="gradio")
    commit = huggingface_hub.upload_folder(repo_id="me/demo-space", folder_path=str(tmp_path / "folder"),
                                           token=TOKEN, commit_message="Space files", repo_type="space",
                                           ignore_patterns=IGNORE_PATTERNS)

    assert repo.repo_type == "space" and repo == f"{fake_hub.url}/spaces/me/demo-space"
    assert fake_hub.repos == {"me/demo-space": {"type": "space", "private": False, "sdk": "gradio"}}
    assert fake_hub.files("me/demo-space") == expected
    assert [(c["repo_type"], c["message"]) for c in fake_hub.commits] == [("space", "Space files")]
    assert commit.commit_url.startswith(f"{fake_hub.url}/spaces/me/demo-space/commit/")
    assert set(fake_hub.authorization_headers) == {f"Bearer {TOKEN}"}
    assert_only_hub_traffic(fake_hub)


def test_upload_to_a_branch(tmp_path, fake_hub):
    expected = make_folder(tmp_path / "folder")
    huggingface_hub.create_repo("me/branchy", token=TOKEN, exist_ok=True)
    with pytest.raises(RevisionNotFoundError):  # as on the Hub: the branch must exist first
        huggingface_hub.upload_folder(repo_id="me/branchy", folder_path=tmp_path / "folder", token=TOKEN,
                                      revision="dev", ignore_patterns=IGNORE_PATTERNS)
    huggingface_hub.create_branch("me/branchy", branch="dev", token=TOKEN, exist_ok=True)
    huggingface_hub.create_branch("me/branchy", branch="dev", token=TOKEN, exist_ok=True)  # 409 tolerated
    huggingface_hub.upload_folder(repo_id="me/branchy", folder_path=tmp_path / "folder", token=TOKEN,
                                  revision="dev", ignore_patterns=IGNORE_PATTERNS)
    assert fake_hub.files("me/branchy", revision="dev") == expected
    assert fake_hub.files("me/branchy", revision="main") == {}
    assert [c["revision"] for c in fake_hub.commits] == ["dev"]
    assert fake_hub.unknown_requests == []


def test_upload_with_delete_patterns_deletes_only_what_matches(tmp_path, fake_hub, upload_path):
    api = huggingface_hub.HfApi(token=TOKEN)
    api.create_repo("me/pruned", exist_ok=True)
    first = {".gitattributes": b"*.safetensors filter=lfs\n", "notes.md": b"mine", "unet_raw/config.json": b"{}",
             "unet_raw/weights.safetensors": b"raw", "unet/config.json": b"{}", "sub/unet_raw/x": b"deep"}
    for relative, data in first.items():
        (tmp_path / "first" / relative).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "first" / relative).write_bytes(data)
    api.upload_folder(repo_id="me/pruned", folder_path=tmp_path / "first")
    assert {entry.path for entry in api.list_repo_tree("me/pruned")} == {".gitattributes", "notes.md", "sub",
                                                                         "unet", "unet_raw"}
    assert sorted(api.list_repo_files("me/pruned")) == sorted(first)
    (tmp_path / "second" / "unet").mkdir(parents=True)
    (tmp_path / "second" / "unet" / "config.json").write_bytes(b'{"new": 1}')
    api.upload_folder(repo_id="me/pruned", folder_path=tmp_path / "second",
                      delete_patterns=["unet/*", "unet_raw/*", ".gitattributes"])
    assert fake_hub.files("me/pruned") == {".gitattributes": first[".gitattributes"], "notes.md": b"mine",
                                           "sub/unet_raw/x": b"deep", "unet/config.json": b'{"new": 1}'}
    assert_only_hub_traffic(fake_hub)


def test_unknown_requests_are_recorded(fake_hub):
    with pytest.raises(HfHubHTTPError) as error:
        huggingface_hub.HfApi().list_repo_commits("me/nothing", token=TOKEN)
    assert error.value.response.status_code == 404
    assert fake_hub.unknown_requests == [("GET", "/api/models/me/nothing/commits/main")]


def test_subprocess_uses_hf_endpoint(tmp_path):
    expected = make_folder(tmp_path / "folder")
    script = textwrap.dedent("""
        import sys
        from huggingface_hub import create_repo, upload_folder
        repo = create_repo(sys.argv[1], token=sys.argv[2], exist_ok=True, repo_type="model")
        commit = upload_folder(repo_id=repo.repo_id, folder_path=sys.argv[3], token=sys.argv[2],
                               commit_message="from a subprocess", ignore_patterns=["logs/**", "*.tmp"])
        print(commit.commit_url)
    """)
    with FakeHub(user="someone") as hub:
        env = hub.subprocess_env(HF_HOME=str(tmp_path / "hf_home"), HF_HUB_OFFLINE="0")
        assert env["HF_ENDPOINT"] == hub.url
        result = subprocess.run([sys.executable, "-c", script, "tiny-ddpm", TOKEN, str(tmp_path / "folder")],
                                env=env, capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, result.stderr
        # No namespace given: the fake, like the Hub, puts the repo under the token's user.
        assert hub.repos == {"someone/tiny-ddpm": {"type": "model", "private": False}}
        assert result.stdout.strip() == f"{hub.url}/someone/tiny-ddpm/commit/{hub.commits[0]['oid']}"
        assert hub.files("someone/tiny-ddpm") == expected
        assert hub.commits[0]["message"] == "from a subprocess"
        assert set(hub.authorization_headers) == {f"Bearer {TOKEN}"}
        assert_only_hub_traffic(hub)


def test_failing_commit_raises_and_commits_nothing(tmp_path, fake_hub, upload_path):
    # A 4xx: the client gives up at once. (It may retry 429/5xx with backoff, which is its own business.)
    make_folder(tmp_path / "folder")
    huggingface_hub.create_repo("me/failing", token=TOKEN, exist_ok=True)
    fake_hub.fail_with(403)
    with pytest.raises(HfHubHTTPError) as error:
        huggingface_hub.upload_folder(repo_id="me/failing", folder_path=tmp_path / "folder", token=TOKEN,
                                      ignore_patterns=IGNORE_PATTERNS)
    assert error.value.response.status_code == 403
    assert fake_hub.commits == [] and fake_hub.files("me/failing") == {}

    fake_hub.fail_with(None)  # the hub is back: the same upload now goes through
    huggingface_hub.upload_folder(repo_id="me/failing", folder_path=tmp_path / "folder", token=TOKEN,
                                  ignore_patterns=IGNORE_PATTERNS)
    assert len(fake_hub.commits) == 1
