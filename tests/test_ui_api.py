"""`lrkit ui` driven through its API with gradio_client, as the page drives it, on the toy base.

One app serves the module (in-process, on a free port, its own data root). Two sessions train at once: the first
trains a LoRA from the toy subject's photos, the second is queued behind it and cancelled once it runs. The trained
concept is then generated in every mode, its images carry their settings, its kohya file and bundle zip download,
the zip imports back; hostile zips and bad inputs are refused with a message and leave nothing behind.
"""

from __future__ import annotations

import html
import os
import stat
import time
import zipfile
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"

import pytest  # noqa: E402
from gradio_client import Client, handle_file  # noqa: E402
from gradio_client.exceptions import AppError  # noqa: E402
from gradio_client.utils import Status  # noqa: E402

from lrkit.concept import Concept  # noqa: E402
from lrkit.ui.zips import ZipLimits  # noqa: E402
from ui_serving import serving  # noqa: E402

SUBJECT = "toy_ball"
CONCEPT = "ball"
CLASS_WORD = "red checked ball"
ALL_MODES = ["vanilla", "personalized", "layout", "layout-retouch", "dual-reference"]
LIMITS = ZipLimits(max_zip_bytes=64 << 20, max_unpacked_bytes=64 << 20, max_entries=200)


def refusal(call) -> str:
    """The message a refused call shows in the page (gr.Error), as plain text."""
    with pytest.raises(AppError) as err:
        call()
    return html.unescape(str(err.value.message if hasattr(err.value, "message") else err.value)).replace("<br>", "\n")


def entries(folder: Path) -> list[str]:
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*"))


def generate_args(prompt: str, modes: list[str], style: str | None = None, seeds: str = "0", lam: float = 0.3):
    """The Generate tab's inputs: concept, prompt, modes, seeds, steps, guidance, negative, size, lam, vanilla
    phrase, reference, mask threshold, style image, style shift."""
    return [CONCEPT, prompt, modes, seeds, 3, 7.5, "", 0, lam, "", 0, 0.5,
            handle_file(style) if style else None, 0.5]


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    root = tmp_path_factory.mktemp("ui-root")
    with serving(root, zip_limits=LIMITS) as (_, url):
        downloads = tmp_path_factory.mktemp("client-downloads")
        clients = []

        def client() -> Client:
            clients.append(Client(url, verbose=False, analytics_enabled=False, download_files=str(downloads)))
            return clients[-1]

        yield {"root": Path(root), "url": url, "client": client, "downloads": downloads}


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> list[str]:
    from lrkit.demo import write_photos
    from lrkit.toyworld.subjects import get_subject

    folder = write_photos(get_subject(SUBJECT), tmp_path_factory.mktemp("toy-photos"), n=4)
    return sorted(str(p) for p in folder.glob("photo_*.png"))


@pytest.fixture(scope="module")
def style(tmp_path_factory) -> str:
    from lrkit.toyworld.render import render
    from lrkit.toyworld.world import SceneSpec

    path = tmp_path_factory.mktemp("style") / "night.png"
    render(SceneSpec("night"), [], 64).image.save(path)
    return str(path)


@pytest.fixture(scope="module")
def trained(app, photos):
    """Session A trains CONCEPT (4 steps, a validation image every 2); session B, submitted while A runs, waits in
    the queue, then is cancelled once it runs. Returns what both saw."""
    a, b = app["client"](), app["client"]()
    preset, _, _ = a.predict("lora", api_name="/preset")
    preset += "\n" if not preset.endswith("\n") else ""
    preset = preset.replace("validation:\n", "validation:\n  num_inference_steps: 3\n")
    assert "num_inference_steps: 3" in preset
    started = time.monotonic()
    job_a = a.submit([handle_file(p) for p in photos], None, CONCEPT, CLASS_WORD, "lora", 4, 64, 0, "", 2, preset,
                     api_name="/train")
    while not job_a.outputs() and not job_a.done():
        time.sleep(0.1)
    folders = a.predict(api_name="/refresh")[4]["choices"]
    assert len(folders) == 1, folders  # A's checked photos, stored in uploads/
    job_b = b.submit(None, folders[0][0], "cancelled", CLASS_WORD, "lora", 1000, 64, 0, "", 0, preset,
                     api_name="/train")
    b_states = []
    while not job_a.done():
        b_states.append(job_b.status().code)
        time.sleep(0.2)
    a_updates = [html.unescape(out[0]) for out in job_a.outputs()]
    a_final = job_a.result()
    while not job_b.outputs() and not job_b.done():
        time.sleep(0.1)
    b_cancel = b.predict(api_name="/cancel_training")
    b_final = job_b.result()
    return {"a_updates": a_updates, "a_final": a_final, "b_states": b_states, "b_cancel": b_cancel,
            "b_final": b_final, "seconds": time.monotonic() - started}


# ------------------------------------------------------------------------------------ training


def test_training_streams_progress_loss_and_validation_images_then_publishes_the_bundle(app, trained):
    status, loss, validation = trained["a_final"]
    status = html.unescape(status)
    assert "Done" in status and f"concepts/{CONCEPT}" in status
    steps = [int(u.split("step ")[1].split("/")[0]) for u in trained["a_updates"] if "step " in u]
    assert steps == sorted(steps) and steps[-1] == 4 and len(set(steps)) >= 3  # the page saw the steps go by
    assert [row[0] for row in loss["data"]] == [1, 2, 3, 4]  # the run's logged loss of every step
    assert all(value > 0 for _, value in loss["data"])
    assert [item["caption"] for item in validation] == ["step000002", "step000004"]
    concept = Concept.load(app["root"] / "concepts" / CONCEPT)
    assert (concept.name, concept.method, concept.class_word, concept.base.id) == (CONCEPT, "lora", CLASS_WORD, "toy")
    assert len(concept.refs) == 4
    jobs = [p for p in (app["root"] / "jobs").iterdir()]
    assert len(jobs) == 1 and not (jobs[0] / "checkpoints").exists() and (jobs[0] / "validation").is_dir()


def test_a_second_session_waits_in_the_queue_and_its_cancelled_run_leaves_nothing(app, trained):
    assert Status.IN_QUEUE in trained["b_states"]  # B's page showed its place in the queue while A trained
    assert "Cancelling" in trained["b_cancel"]
    status = html.unescape(trained["b_final"][0])
    assert "Cancelled" in status and "Nothing was saved" in status
    assert not (app["root"] / "concepts" / "cancelled").exists()
    assert [p.name.endswith(f"-{CONCEPT}") for p in (app["root"] / "jobs").iterdir()] == [True]  # B's folder is gone
    assert not list((app["root"] / "concepts").glob(".*"))


def test_the_concept_appears_in_every_tab_with_its_manifest_summary(app, trained):
    c = app["client"]()
    generate_list, eval_list, pick_list, table, _ = c.predict(api_name="/refresh")
    for dropdown in (generate_list, eval_list, pick_list):
        assert [choice[0] for choice in dropdown["choices"]] == [CONCEPT]
    assert table["data"][0][:4] == [CONCEPT, "lora", "sks", CLASS_WORD]
    summary, refs, manifest = c.predict(CONCEPT, api_name="/concept_details")
    assert "sks red checked ball" in summary and manifest["name"] == CONCEPT
    assert len(refs) == 4


def test_bad_training_input_gets_a_message_and_writes_nothing(app, trained, photos, tmp_path):
    c = app["client"]()
    preset, _, _ = c.predict("lora", api_name="/preset")
    before = {name: entries(app["root"] / name) for name in ("uploads", "jobs", "concepts")}

    def train(files, name="other", yaml_text=preset, class_word=CLASS_WORD):
        return lambda: c.predict(files, None, name, class_word, "lora", 2, 64, 0, "", 0, yaml_text, api_name="/train")

    assert "no photos" in refusal(train(None))
    fake = tmp_path / "fake.png"
    fake.write_text("not a picture")
    message = refusal(train([handle_file(photos[0]), handle_file(str(fake))]))
    assert "fake.png" in message and "not a readable image" in message
    assert "already exists" in refusal(train([handle_file(photos[0])], name=CONCEPT))
    assert "name" in refusal(train([handle_file(photos[0])], name="../escape"))
    assert "class word" in refusal(train([handle_file(photos[0])], class_word=" "))
    message = refusal(train([handle_file(photos[0])], yaml_text=preset + "\nmax_steps: 3\n"))
    assert "max_steps is set by the form" in message
    message = refusal(train([handle_file(photos[0])], yaml_text=preset + "\nlora:\n  rank: 0\n"))
    assert "lora.rank" in message
    assert {name: entries(app["root"] / name) for name in before} == before


def test_the_preset_is_the_shipped_yaml_without_the_form_s_options(app):
    c = app["client"]()
    text, steps, every = c.predict("textual_inversion", api_name="/preset")
    assert steps == 2000 and every == 500  # configs/train/textual_inversion.yaml's own values, in the form
    assert "num_vectors: 2" in text and "embedding_lr" in text
    assert "max_steps:" not in text and "photos:" not in text and "initializer" not in text


def test_an_sdxl_base_starts_from_the_sdxl_preset_where_there_is_one(tmp_path):
    """On an SDXL base the Train tab shows configs/train/sdxl_<method>.yaml (gradient checkpointing, 8-bit AdamW:
    what fits a 24 GB card); a method without an SDXL preset keeps its own."""
    import yaml

    from lrkit.ui.workspace import Workspace

    xl, sd = Workspace(tmp_path / "xl", base="tiny-random-xl"), Workspace(tmp_path / "sd", base="tiny-random")
    lora_xl = yaml.safe_load(xl.preset("lora")[0])
    assert lora_xl["gradient_checkpointing"] is True and lora_xl["optim"]["optimizer"] == "adamw8bit"
    assert lora_xl["family"] == "sdxl"
    assert "gradient_checkpointing" not in yaml.safe_load(sd.preset("lora")[0])
    assert xl.preset("pivotal")[0] == sd.preset("pivotal")[0]  # no sdxl_pivotal.yaml: the method's own


# ------------------------------------------------------------------------------------ generation


def test_every_mode_generates_side_by_side_with_its_intermediates(app, trained, style):
    c = app["client"]()
    gallery, status, files = c.predict(*generate_args("a photo of {} on the beach", ALL_MODES, style, seeds="0,1"),
                                       api_name="/generate")
    assert "10/10 images" in status
    assert gallery["columns"] == 5
    assert [item["caption"] for item in gallery["value"]] == [f"seed {s} · {m}" for s in (0, 1) for m in ALL_MODES]
    assert len(files) == 10
    from PIL import Image

    for item in gallery["value"]:
        with Image.open(item["image"]) as image:
            assert image.size == (64, 64)
    kinds = {}
    for index, mode in enumerate(ALL_MODES):
        layout, mask, reference, style_used, png, settings, note = c.predict(index, api_name="/intermediates")
        kinds[mode] = [name for name, path in (("layout", layout), ("mask", mask), ("reference", reference),
                                               ("style", style_used)) if path]
        assert settings["options"]["mode"] == mode and settings["seed"] == 0
    assert kinds == {"vanilla": [], "personalized": [], "layout": [], "layout-retouch": ["layout", "mask", "reference"],
                     "dual-reference": ["mask", "reference", "style"]}
    runs = list((app["root"] / "outputs" / "generate").iterdir())
    assert len(runs) == 1 and sorted(p.name for p in runs[0].iterdir()) == sorted(ALL_MODES)


def test_pngs_carry_their_settings_and_dropping_one_back_reloads_them(app, trained):
    from PIL import Image

    c = app["client"]()
    gallery, _, _ = c.predict(*generate_args("a photo of {} in the snow", ["layout-retouch"], seeds="7", lam=0.45),
                              api_name="/generate")
    png = gallery["value"][0]["image"]
    with Image.open(png) as image:
        parameters = image.info["parameters"]
        assert parameters.startswith("a photo of sks red checked ball in the snow\nSteps: 3, Sampler: DDIM")
        assert "Seed: 7" in parameters and "lrkit lambda: 0.45" in parameters
    out = c.predict(handle_file(png), api_name="/read_settings")
    concept, prompt, modes, seeds, steps, guidance, negative, size, lam = out[:9]
    assert concept["value"] == CONCEPT
    assert (prompt, modes, seeds, steps, guidance, size, lam) == (
        "a photo of sks red checked ball in the snow", ["layout-retouch"], "7", 3, 7.5, 64, 0.45)
    assert "Settings loaded" in out[-1]
    plain = app["downloads"] / "plain.png"
    Image.new("RGB", (8, 8)).save(plain)
    assert "no generation settings" in refusal(lambda: c.predict(handle_file(str(plain)), api_name="/read_settings"))


def test_a_prompt_without_the_concept_phrase_is_refused_and_nothing_is_written(app, trained, style):
    c = app["client"]()
    before = entries(app["root"] / "outputs")
    message = refusal(lambda: c.predict(*generate_args("a photo of a dog", ["personalized"]), api_name="/generate"))
    assert "neither the concept token 'sks'" in message
    message = refusal(lambda: c.predict(*generate_args("a photo of {}", ["dual-reference"]), api_name="/generate"))
    assert "needs a style image" in message
    assert "at least one mode" in refusal(lambda: c.predict(*generate_args("a photo of {}", []), api_name="/generate"))
    assert entries(app["root"] / "outputs") == before
    gallery, _, _ = c.predict(*generate_args(f"a photo of a {CLASS_WORD}", ["vanilla"]), api_name="/generate")
    assert len(gallery["value"]) == 1  # vanilla needs no concept token


def test_a_stopped_generation_keeps_nothing(app, trained):
    c = app["client"]()
    before = entries(app["root"] / "outputs")
    job = c.submit(*generate_args("a photo of {} on the grass", ["personalized", "layout", "layout-retouch"],
                                  seeds="0-3"), api_name="/generate")
    while not job.outputs() and not job.done():
        time.sleep(0.05)
    assert "Stopping" in c.predict(api_name="/stop_generation")
    gallery, status, _ = job.result()
    assert "Stopped" in html.unescape(status) and gallery == []
    assert entries(app["root"] / "outputs") == before


def test_the_phrase_button_inserts_the_concept_phrase(app, trained):
    c = app["client"]()
    assert c.predict(CONCEPT, "a photo of", api_name="/insert_phrase") == "a photo of sks red checked ball"


# ------------------------------------------------------------------------------------ bundles in and out


def test_kohya_file_and_bundle_zip_download_and_the_zip_imports_back(app, trained):
    import shutil

    c = app["client"]()
    bundle = app["root"] / "concepts" / CONCEPT
    kohya = c.predict(CONCEPT, api_name="/kohya_file")
    assert Path(kohya).name == f"{CONCEPT}.kohya.safetensors"
    assert Path(kohya).read_bytes() == (bundle / f"{CONCEPT}.kohya.safetensors").read_bytes()
    archive = c.predict(CONCEPT, api_name="/export_zip")
    with zipfile.ZipFile(archive) as z:
        assert f"{CONCEPT}/concept.json" in z.namelist()
    message = refusal(lambda: c.predict(handle_file(archive), api_name="/import_zip"))
    assert "already exists" in message and "nothing was imported" in message
    original = {p.relative_to(bundle).as_posix(): p.read_bytes() for p in bundle.rglob("*") if p.is_file()}
    shutil.rmtree(bundle)
    status = c.predict(handle_file(archive), api_name="/import_zip")
    assert "Imported" in html.unescape(status)
    assert {p.relative_to(bundle).as_posix(): p.read_bytes() for p in bundle.rglob("*") if p.is_file()} == original
    assert Concept.load(bundle).name == CONCEPT
    assert not [e for e in entries(app["root"] / "tmp") if e.startswith("import-")]


def _zip(path: Path, members: dict, symlink: str | None = None) -> str:
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as z:
        for name, data in members.items():
            z.writestr(name, data)
        if symlink is not None:
            info = zipfile.ZipInfo(symlink)
            info.external_attr = (stat.S_IFLNK | 0o777) << 16
            z.writestr(info, "/etc/passwd")
    return str(path)


@pytest.mark.parametrize("members,symlink,expected", [
    ({"../escape/concept.json": "{}"}, None, "'..' part"),
    ({"ok/concept.json": "{}", "ok/../../evil.txt": "x"}, None, "'..' part"),
    ({"/abs/concept.json": "{}"}, None, "absolute path"),
    ({"b/concept.json": "{}"}, "b/refs/link.png", "symlink"),
    ({"b/readme.txt": "x"}, None, "no concept.json"),
    ({"b/concept.json": '{"schema": "lrkit.concept/1", "name": "x"}'}, None, "missing field"),
    ({f"b/f{i}.txt": "x" for i in range(201)}, None, "entries; at most 200"),
    ({"b/concept.json": "{}", "b/big.bin": b"\0" * (65 << 20)}, None, "more than 64 MiB"),
])
def test_hostile_zips_are_refused_with_a_message_and_nothing_is_written(app, trained, tmp_path, members, symlink,
                                                                         expected):
    c = app["client"]()
    before = {name: entries(app["root"] / name) for name in ("concepts",)}
    archive = _zip(tmp_path / "hostile.zip", members, symlink)
    assert expected in refusal(lambda: c.predict(handle_file(archive), api_name="/import_zip"))
    assert entries(app["root"] / "concepts") == before["concepts"]
    assert not [e for e in entries(app["root"] / "tmp") if e.startswith("import-")]  # the unpacking folder is gone
    assert not (app["root"] / "escape").exists() and not (app["root"] / "evil.txt").exists()


def test_a_file_that_is_no_zip_is_refused(app, tmp_path):
    c = app["client"]()
    fake = tmp_path / "bundle.zip"
    fake.write_text("PK? no")
    assert "not a zip file" in refusal(lambda: c.predict(handle_file(str(fake)), api_name="/import_zip"))


# ------------------------------------------------------------------------------------ evaluation


def test_evaluate_shows_the_toy_scores_bar_charts_and_centre_heatmaps(app, trained):
    c = app["client"]()
    table, plots, status = c.predict(CONCEPT, SUBJECT, ["personalized", "layout-retouch"], "2", 1, 3,
                                     api_name="/evaluate")
    assert "| method |" in table and "personalized" in table and "layout-retouch" in table
    assert "subject rate" in table and "scene rate" in table  # the toy world's scores
    captions = [item["caption"] for item in plots]
    assert "centers personalized" in captions and "centers layout retouch" in captions
    assert "subject rate" in captions and "scene rate" in captions
    assert "Results in" in status
    message = refusal(lambda: c.predict(CONCEPT, SUBJECT, [], "2", 1, 3, api_name="/evaluate"))
    assert "at least one mode" in message


# ------------------------------------------------------------------------------------ training jobs, unit by unit

FAKE_WORKER = """
import json, os, sys, time
request, fd = sys.argv[1], int(sys.argv[2])
config = json.load(open(request))["config"]
events = os.fdopen(fd, "w", buffering=1)
mode = config["fake"]
for step in range(1, 4):
    events.write(json.dumps({"event": "progress", "step": step, "total": 3, "loss": 1.0 / step}) + "\\n")
    time.sleep(0.3 if mode != "slow" else 1.0)
if mode == "fail":
    events.write(json.dumps({"event": "error", "message": "data.photos: no photos", "bug": False}) + "\\n")
    sys.exit(2)
bundle = os.path.join(config["output_dir"], "concept")
os.makedirs(bundle)
open(os.path.join(bundle, "concept.json"), "w").write("{}")
events.write(json.dumps({"event": "done", "bundle": bundle}) + "\\n")
"""


def fake_job(tmp_path, mode: str, ended: list):
    import sys

    from lrkit.ui.training import TrainingJob

    script = tmp_path / "fake_worker.py"
    script.write_text(FAKE_WORKER)
    job_dir = tmp_path / "jobs" / f"run-{mode}"
    config = {"fake": mode, "output_dir": str(job_dir), "max_steps": 3}
    return TrainingJob(config, job_dir, tmp_path / "concepts" / mode, on_end=lambda: ended.append(mode),
                       worker=[sys.executable, str(script)])


def test_a_training_job_streams_steps_and_publishes_its_bundle(tmp_path):
    ended = []
    job = fake_job(tmp_path, "ok", ended)
    (tmp_path / "concepts").mkdir()
    job.start()
    states = [(s.step, list(s.losses)) for s in job.updates(interval=0.05)]
    assert states[-1] == (3, [(1, 1.0), (2, 0.5), (3, 1 / 3)])
    assert job.state.bundle == tmp_path / "concepts" / "ok" and (job.state.bundle / "concept.json").is_file()
    assert ended == ["ok"]


def test_a_training_whose_page_goes_away_goes_on_and_publishes_its_bundle(tmp_path):
    ended = []
    job = fake_job(tmp_path, "slow", ended)
    (tmp_path / "concepts").mkdir()
    job.start()
    updates = job.updates(interval=0.05)
    next(updates)
    updates.close()  # what Gradio does when the browser tab closes
    assert not job.attended and ended == []
    deadline = time.monotonic() + 30
    while not ended and time.monotonic() < deadline:
        time.sleep(0.1)
    assert ended == ["slow"] and (tmp_path / "concepts" / "slow" / "concept.json").is_file()


def test_a_cancelled_or_failed_training_leaves_no_folder(tmp_path):
    from lrkit.ui.training import TrainingFailed

    ended = []
    job = fake_job(tmp_path, "slow", ended)
    job.start()
    updates = job.updates(interval=0.05)
    next(updates)
    job.cancel()
    final = list(updates)[-1]
    assert final.cancelled and not (tmp_path / "jobs" / "run-slow").exists() and ended == ["slow"]
    job = fake_job(tmp_path, "fail", ended)
    job.start()
    with pytest.raises(TrainingFailed, match="data.photos: no photos") as err:
        list(job.updates(interval=0.05))
    assert err.value.user_error and not (tmp_path / "jobs" / "run-fail").exists() and ended == ["slow", "fail"]
    assert not (tmp_path / "concepts").exists()


def test_the_worker_reports_each_step_and_its_loss_from_a_training_callback():
    from types import SimpleNamespace

    import torch

    from lrkit.ui.worker import progress_callback

    sent = []

    class Events:
        def emit(self, **event):
            sent.append(event)

    callback = progress_callback(Events())
    for step, loss in ((1, 0.5), (2, 0.25)):
        trainer = SimpleNamespace(is_global_zero=True, global_step=step, max_steps=4)
        callback.on_train_batch_end(trainer, None, {"loss": torch.tensor(loss)}, None, step - 1)
    callback.on_train_batch_end(SimpleNamespace(is_global_zero=False, global_step=3, max_steps=4), None,
                                torch.tensor(1.0), None, 2)  # other ranks say nothing
    assert sent == [{"event": "progress", "step": 1, "total": 4, "loss": 0.5},
                    {"event": "progress", "step": 2, "total": 4, "loss": 0.25}]


# ------------------------------------------------------------------------------------ launching


def test_exposure_warning_names_who_can_reach_the_app():
    from lrkit.ui.app import exposure_warning, parse_auth

    assert exposure_warning("127.0.0.1", False, None) is None
    warning = exposure_warning("0.0.0.0", False, None)
    assert "every machine that can reach this one" in warning and "no --auth" in warning
    assert "every machine that can reach 10.0.0.5" in exposure_warning("10.0.0.5", False, None)
    warning = exposure_warning("127.0.0.1", True, ("u", "p"))
    assert "gradio.live" in warning and "--auth user and password" in warning
    assert parse_auth("me:s3:cret") == ("me", "s3:cret")
    with pytest.raises(ValueError, match="USER:PASSWORD"):
        parse_auth("nopassword")


def test_lrkit_ui_without_gradio_says_how_to_install_it(monkeypatch, capsys):
    import sys

    from lrkit.cli import main

    monkeypatch.setitem(sys.modules, "gradio", None)
    assert main(["ui", "--root", "unused"]) == 2
    assert "pip install 'lrkit[ui]'" in capsys.readouterr().err


def test_lrkit_ui_refuses_a_malformed_auth(capsys):
    from lrkit.cli import main

    assert main(["ui", "--auth", "nopassword"]) == 2
    assert "USER:PASSWORD" in capsys.readouterr().err
