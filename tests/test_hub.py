"""Model card and Hub upload, against a real HTTP server on 127.0.0.1 that speaks huggingface_hub 2.4's write API."""

from __future__ import annotations

import base64
import json
import re
import threading
import types
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml
from huggingface_hub import ModelCard, constants
from huggingface_hub.utils import _http

from memmit.card import write_model_card
from memmit.cli import main
from memmit.config import MemmitConfig
from memmit.hub import PushError, check_hub_settings, create_repo_early, files_to_upload, push, push_main

from conftest import save_pipeline

TOKEN = "hf_memmitTestSecretToken0123456789"
BASE, DATASET, REPO = "google/ddpm-cifar10-32", "ylecun/mnist", "tester/tiny-memmit"
TAGS = {"diffusers", "diffusers-training", "memorization-mitigation", "iet-agc"}
PRIVATE_FILES = {"checkpoints/checkpoint-4/optimizer.bin", "checkpoints/checkpoint-4/random_states_0.pkl",
                 "checkpoints/checkpoint-4/model.safetensors", "logs/memmit/events.out.tfevents.1.host",
                 "scaler.pt", "optimizer.bin"}


# ---- a fake Hub ----------------------------------------------------------------------------------

class FakeHub:
    """What the server saw and stored, and how it misbehaves."""

    def __init__(self):
        self.requests: list[tuple[str, str, str]] = []  # method, path, authorization header
        self.bodies: list[bytes] = []
        self.repos: dict[str, dict] = {}
        self.files: dict[str, dict[str, bytes]] = {}  # repo -> path -> content
        self.commit_status: int | None = None  # answer every commit with this error status
        self.rejected_tokens: set[str] = set()
        self.url = ""

    def write_auth(self) -> set[str]:
        """The Authorization headers of the write calls (a GET of /api/agent-harnesses goes without)."""
        return {auth for method, _, auth in self.requests if method == "POST"}

    def paths(self, suffix: str) -> list[str]:
        return [path for _, path, _ in self.requests if path.endswith(suffix) or f"/{suffix}/" in path]


def make_handler(hub: FakeHub):
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):  # keep pytest output clean
            pass

        def reply(self, status: int, payload: dict) -> None:
            body = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self):
            self.handle_request(b"")

        def do_POST(self):
            self.handle_request(self.rfile.read(int(self.headers.get("Content-Length", 0))))

        def handle_request(self, body: bytes) -> None:
            path = self.path.split("?")[0]
            auth = self.headers.get("Authorization", "")
            hub.requests.append((self.command, path, auth))
            hub.bodies.append(body)
            if auth.removeprefix("Bearer ") in hub.rejected_tokens:
                return self.reply(401, {"error": "Invalid credentials in Authorization header"})
            if self.command == "POST" and path == "/api/repos/create":
                req = json.loads(body)
                repo = f"{req['organization'] or 'tester'}/{req['name']}"
                hub.repos[repo] = req
                hub.files.setdefault(repo, {})
                return self.reply(200, {"url": f"{hub.url}/{repo}"})
            if self.command == "POST" and path == "/api/validate-yaml":
                yaml.safe_load(json.loads(body)["content"].split("---")[1])
                return self.reply(200, {"errors": [], "warnings": []})
            m = re.fullmatch(r"/api/models/([^/]+/[^/]+)/(preupload|commit)/([^/]+)", path)
            if self.command == "POST" and m and m[1] in hub.repos:
                return self.preupload(json.loads(body)) if m[2] == "preupload" else self.commit(m[1], body)
            self.reply(404, {"error": f"no route for {self.command} {path}"})

        def preupload(self, req: dict) -> None:
            # Every file is a regular git blob: its content travels base64 in the commit, no xet/LFS.
            self.reply(200, {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False, "oid": None}
                                       for f in req["files"]]})

        def commit(self, repo: str, body: bytes) -> None:
            if hub.commit_status:
                return self.reply(hub.commit_status, {"error": "commit rejected by the test server"})
            lines = [json.loads(line) for line in body.decode().splitlines()]
            assert lines[0]["key"] == "header" and lines[0]["value"]["summary"]
            for line in lines[1:]:
                assert line["key"] == "file" and line["value"]["encoding"] == "base64"
                hub.files[repo][line["value"]["path"]] = base64.b64decode(line["value"]["content"])
            oid = f"{len(hub.requests):040x}"
            self.reply(200, {"commitUrl": f"{hub.url}/{repo}/commit/{oid}", "commitOid": oid})

    return Handler


@pytest.fixture
def hub(monkeypatch, tmp_path):
    """A fake Hub on a free port; HF_ENDPOINT points at it and offline mode is off, for this test only."""
    state = FakeHub()
    server = ThreadingHTTPServer(("127.0.0.1", 0), make_handler(state))
    state.url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    # huggingface_hub 2.4 reads both variables once, at import, into `constants`: patch both places.
    monkeypatch.setenv("HF_ENDPOINT", state.url)
    monkeypatch.setattr(constants, "ENDPOINT", state.url)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    # Never send a real login token to the test server.
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    yield state
    server.shutdown()
    server.server_close()
    thread.join()


# ---- a memmit output, by hand ------------------------------------------------------------------

def run_config(**overrides) -> dict:
    return MemmitConfig(pretrained_model_name_or_path=BASE, dataset_name=DATASET, **overrides).to_dict()


def report(memorized: float, fd: float | None) -> dict:
    quality = ({"available": True, "extractor": {"kind": "inception-v3"}, "frechet_distance": fd} if fd is not None
               else {"available": False, "extractor": {"kind": "inception-v3"}, "reason": "offline"})
    return {"settings": {"num_samples": 64}, "quality": quality,
            "pixel": {"threshold": 1 / 3, "fraction_memorized_ratio": memorized, "num_samples": 64,
                      "fraction_memorized_by_score": {"0.1": 0.0, "0.5": memorized / 2}}}


REPORTS = {"before": report(0.25, 12.5), "after": report(0.0625, 13.25)}


@pytest.fixture
def output_dir(tmp_path) -> Path:
    """The trainer's layout: pipeline at the root, memmit/ metadata, plus training state that must stay local."""
    out = tmp_path / "tiny-memmit"
    save_pipeline(out)
    (out / "memmit").mkdir()
    (out / "memmit" / "config.yaml").write_text(yaml.safe_dump(run_config(), sort_keys=False))
    (out / "memmit" / "shards.json").write_text(json.dumps({"0": [0, 2], "1": [1, 3]}))
    (out / "memmit" / "candidates.csv").write_text("rank,sample_id,seen,skipped,skip_fraction,shard,source\n")
    for i, name in enumerate(sorted(PRIVATE_FILES)):
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_bytes(bytes([i]) * 64)
    return out


def snapshot(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


# ---- model card ----------------------------------------------------------------------------------

def test_card_metadata_results_and_body(tmp_path):
    cfg = {**run_config(num_shards=3, local_steps=7, agc_lambda=0.6, agc_exclusion=0.75,
                                agc_bank_bins=50), "hub_token": TOKEN}
    path = write_model_card(tmp_path, cfg, BASE, DATASET, REPORTS, repo_id=REPO)
    assert path == tmp_path / "README.md" and TOKEN not in path.read_text()
    card = ModelCard.load(path)
    data = card.data.to_dict()
    assert data["base_model"] == BASE and data["library_name"] == "diffusers" and data["datasets"] == [DATASET]
    assert set(data["tags"]) == TAGS | {"unconditional-image-generation"}
    results = {r.metric_name: r for r in card.data.eval_results}
    assert {r.task_type for r in results.values()} == {"unconditional-image-generation"}
    assert results["memorized fraction (d1/d2 < 0.333), before"].metric_value == 0.25
    assert results["memorized fraction (d1/d2 < 0.333), after"].metric_value == 0.0625
    assert results["Frechet distance (inception-v3), after"].metric_value == 13.25
    text = card.text
    assert "K = 3" in text and "7 optimizer steps" in text and "λ = 0.6" in text and "full fine-tuning" in text
    assert "trained on once" in text  # the default dedup=keep_one
    assert "skipped in at least 75% of its visits (after 4) is left out of later rounds" in text
    assert "(bank decay β = 0.8, 50 bins of timesteps)" in text
    assert "| memorized fraction (d1/d2 < 0.333) | 25.0% | 6.2% |" in text
    assert f'DiffusionPipeline.from_pretrained("{REPO}")' in text and "2407.15328" in text and "ECCV" in text


def test_card_for_local_sources_lora_text_to_image_without_reports(tmp_path):
    """Local paths are not Hub ids: they stay out of the metadata, which the Hub would reject."""
    local_base, local_data = tmp_path / "base-pipe", tmp_path / "my-data"
    local_base.mkdir()
    local_data.mkdir()
    cfg = run_config(caption_column="text", lora_rank=8, agc_lambda=0.0, num_rounds=3, local_steps=5)
    card = ModelCard.load(write_model_card(tmp_path, cfg, str(local_base), str(local_data), None))
    data = card.data.to_dict()
    assert "base_model" not in data and "datasets" not in data and "model-index" not in data
    assert set(data["tags"]) == TAGS | {"text-to-image"}
    assert "LoRA of rank 8" in card.text and "off (λ = 0)" in card.text and str(tmp_path) not in card.text
    assert "off: one model on all the data (K = 1, memmit's default), 3 rounds of 5 optimizer steps" in card.text
    assert 'DiffusionPipeline.from_pretrained("' + tmp_path.name + '")' in card.text  # default repo id: the dir's name
    assert 'image = pipe("A PROMPT").images[0]' in card.text  # a text-to-image pipeline needs a prompt


# ---- upload --------------------------------------------------------------------------------------

def test_push_uploads_pipeline_card_and_metadata_only(hub, output_dir, capsys):
    write_model_card(output_dir, {**run_config(), "hub_token": TOKEN}, BASE, DATASET, REPORTS, repo_id=REPO)
    before = snapshot(output_dir)
    url = push(output_dir, REPO, token=TOKEN, private=True)

    assert url.startswith(f"{hub.url}/{REPO}/commit/") and hub.repos[REPO]["visibility"] == "private"
    uploaded = hub.files[REPO]
    assert sorted(uploaded) == files_to_upload(output_dir) == sorted(set(before) - PRIVATE_FILES)
    assert {"model_index.json", "README.md", "memmit/config.yaml", "unet/diffusion_pytorch_model.safetensors"} <= set(uploaded)
    assert all(uploaded[name] == before[name] for name in uploaded)  # byte-identical
    assert snapshot(output_dir) == before
    assert ModelCard(uploaded["README.md"].decode()).data.to_dict()["model-index"]
    # The token authenticated every write but is in no file, request body or printed line.
    assert hub.write_auth() == {f"Bearer {TOKEN}"}
    assert not any(TOKEN.encode() in body for body in hub.bodies)
    assert not any(TOKEN.encode() in content for content in snapshot(output_dir).values())
    assert TOKEN not in "".join(capsys.readouterr())
    # The card's YAML is validated server-side before any file is sent.
    assert hub.paths("validate-yaml") and hub.paths("preupload") and hub.paths("commit")


def test_push_cli_writes_missing_card_and_takes_token_from_env(hub, output_dir, monkeypatch, capsys):
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    assert main(["push", str(output_dir), "--repo_id", REPO]) == 0
    out, err = capsys.readouterr()
    assert f"{hub.url}/{REPO}/commit/" in out and TOKEN not in out + err
    assert hub.write_auth() == {f"Bearer {TOKEN}"}
    card = ModelCard(hub.files[REPO]["README.md"].decode())
    assert card.data.base_model == BASE and f'from_pretrained("{REPO}")' in card.text
    assert (output_dir / "README.md").read_bytes() == hub.files[REPO]["README.md"]


@pytest.mark.parametrize("status", [403, 500])
def test_rejected_commit_keeps_output_and_names_retry_command(hub, output_dir, monkeypatch, capsys, status):
    # huggingface_hub retries a 5xx commit 5 times with 1..8 s waits: skip the waits, keep the retries.
    monkeypatch.setattr(_http, "time", types.SimpleNamespace(sleep=lambda seconds: None))
    write_model_card(output_dir, run_config(), BASE, DATASET, None, repo_id=REPO)
    before = snapshot(output_dir)
    hub.commit_status = status
    assert push_main([str(output_dir), "--repo_id", REPO, "--token", TOKEN]) == 1
    out, err = capsys.readouterr()
    assert f"memmit push {output_dir} --repo_id {REPO}" in err and str(status) in err
    assert err.startswith("memmit: error:") and TOKEN not in out + err
    assert snapshot(output_dir) == before and hub.files[REPO] == {}
    assert len(hub.paths("commit")) == (6 if status == 500 else 1)

    with pytest.raises(PushError, match=re.escape(f"retry with: memmit push {output_dir} --repo_id {REPO}")):
        push(output_dir, REPO, token=TOKEN)


def test_push_refuses_a_config_holding_the_token(hub, output_dir):
    (output_dir / "memmit" / "config.yaml").write_text(yaml.safe_dump({**run_config(), "hub_token": TOKEN}))
    with pytest.raises(ValueError, match="hub_token"):
        push(output_dir, REPO, token=TOKEN)
    assert hub.requests == []


def test_push_cli_bad_input_exits_2(hub, tmp_path, output_dir, capsys):
    assert main(["push", str(tmp_path / "missing"), "--repo_id", REPO]) == 2
    assert "no model_index.json" in capsys.readouterr().err
    assert push_main([str(output_dir), "--repo_id", "bad//name"]) == 2
    assert "invalid Hub repo id" in capsys.readouterr().err
    assert hub.requests == []


# ---- before training: repo and settings ---------------------------------------------------------

def test_create_repo_early(hub):
    assert create_repo_early("tiny-run", TOKEN, private=False) == "tester/tiny-run"  # the Hub adds the namespace
    assert "visibility" not in hub.repos["tester/tiny-run"]  # the namespace's default applies
    with pytest.raises(ValueError, match="invalid Hub repo id 'bad//name'"):
        create_repo_early("bad//name", TOKEN, private=False)
    hub.rejected_tokens.add(TOKEN)
    with pytest.raises(ValueError, match=r"cannot create Hub repo 'tester/x'.*401") as info:
        create_repo_early("tester/x", TOKEN, private=True)
    assert TOKEN not in str(info.value) and "write access" in str(info.value)


def test_hub_settings_offline_and_default_repo_id(monkeypatch, tmp_path, capsys):
    out = tmp_path / "my-run"
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ValueError, match="--push_to_hub needs the Hub, but HF_HUB_OFFLINE=1"):
        check_hub_settings(True, None, out)
    assert check_hub_settings(False, None, out) is None
    save_pipeline(out)
    assert push_main([str(out), "--repo_id", REPO]) == 2
    assert "HF_HUB_OFFLINE" in capsys.readouterr().err

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # set after huggingface_hub was imported
    with pytest.raises(ValueError, match="HF_HUB_OFFLINE"):
        check_hub_settings(True, "me/run", out)
    monkeypatch.delenv("HF_HUB_OFFLINE")
    assert check_hub_settings(True, None, f"{out}/") == "my-run"
    assert check_hub_settings(True, "me/run", out) == "me/run"


def test_training_with_push_to_hub_creates_repo_first_and_uploads_the_result(hub, tiny_pipeline, digits_dir, tmp_path,
                                                                             capsys):
    from accelerate.state import AcceleratorState

    from memmit.cli import train_main

    out = tmp_path / "run"
    flags = ["--pretrained_model_name_or_path", tiny_pipeline, "--dataset_name", digits_dir, "--output_dir", str(out),
             "--num_shards", "2", "--num_rounds", "1", "--local_steps", "1", "--train_batch_size", "4",
             "--report_to", "none", "--push_to_hub", "--hub_model_id", REPO, "--hub_token", TOKEN]
    try:
        hub.rejected_tokens.add(TOKEN)
        assert train_main(flags) == 2  # a rejected token fails before any training
        assert not (out / "checkpoints").exists() and "memmit: error:" in capsys.readouterr().err
        AcceleratorState._reset_state(reset_partial_state=True)
        hub.rejected_tokens.clear()
        assert train_main(flags + ["--overwrite_output_dir"]) == 0
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
    posts = [path for method, path, _ in hub.requests if method == "POST"]
    assert posts.index("/api/repos/create") < min(i for i, p in enumerate(posts) if "/commit/" in p)
    uploaded = hub.files[REPO]
    assert "model_index.json" in uploaded and not any(p.startswith(("checkpoints/", "logs/")) for p in uploaded)
    assert all(uploaded[name] == (out / name).read_bytes() for name in uploaded)
    assert not any(TOKEN.encode() in p.read_bytes() for p in out.rglob("*") if p.is_file())
    assert TOKEN not in "".join(capsys.readouterr())


def test_push_cli_puts_eval_reports_into_the_card(hub, output_dir, tmp_path, capsys):
    paths = []
    for label, rep in REPORTS.items():
        path = tmp_path / label
        path.mkdir()
        (path / "report.json").write_text(json.dumps(rep))
        paths.append(f"{label}={path}")
    argv = [str(output_dir), "--repo_id", REPO, "--token", TOKEN]
    assert push_main(argv + ["--eval_report", "during=" + str(tmp_path / "nowhere")]) == 2
    assert "expected LABEL=PATH" in capsys.readouterr().err
    assert push_main(argv + [a for p in paths for a in ("--eval_report", p)]) == 0
    card = ModelCard(hub.files[REPO]["README.md"].decode())
    metrics = card.data.to_dict()["model-index"][0]["results"][0]["metrics"]
    assert {m["name"] for m in metrics} >= {"memorized fraction (d1/d2 < 0.333), before",
                                             "memorized fraction (d1/d2 < 0.333), after"}
    assert "25.0" in card.text and "6.2" in card.text


def test_text_to_image_card_tags_its_evaluations_and_names_the_sampler(tmp_path):
    """An SD3 run's card: the eval results are text-to-image ones, the steps are its sampler's, not DDIM's, and the
    weights are its denoiser's (a transformer), not a UNet's."""
    sd3 = {name: {**r, "settings": {**r["settings"], "sampler": "FlowMatchEulerDiscrete", "caption_column": "text",
                                    "num_inference_steps": 50}}
           for name, r in REPORTS.items()}
    card = ModelCard.load(write_model_card(tmp_path, run_config(caption_column="text"), BASE, DATASET, sd3,
                                           repo_id=REPO))
    assert {r.task_type for r in card.data.eval_results} == {"text-to-image"}
    assert "50 FlowMatchEulerDiscrete steps" in card.text and "DDIM" not in card.text
    assert "full fine-tuning of the denoiser" in card.text and "UNet" not in card.text
