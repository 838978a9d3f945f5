"""The `lrkit ui` page (Gradio): four tabs wired to the workspace, the training jobs and the generator.

Every handler turns lrkit's errors into a message in the page (`gr.Error`, one line, no traceback; a bug says
so and leaves its traceback in the server log) and lrkit's warnings into `gr.Warning` toasts. Training,
generation and evaluation share one queue slot (`DEVICE`, concurrency 1): one job at a time on the device, and
the page of a second user shows their job's place in the queue. They also take the `DeviceSlot`, which a training
whose page went away keeps until it ends. Each handler has an `api_name`, so `gradio_client` can drive the app as
the page does.
"""

from __future__ import annotations

import contextlib
import functools
import html
import inspect
import logging
import os
from pathlib import Path

import gradio as gr

from lrkit.errors import is_user_error
from lrkit.inference.options import MODES
from lrkit.ui.generation import GenerationRun, GenerationStopped, Generator, form_values, parse_seeds
from lrkit.ui.pngmeta import read_settings
from lrkit.ui.training import DeviceSlot, JobBoard, TrainingJob, TrainingState
from lrkit.ui.workspace import ROW_HEADERS, TRAIN_METHODS, UIError, Workspace, stamp
from lrkit.ui.zips import ZipLimits

logger = logging.getLogger(__name__)

DEVICE = "device"
"""The queue slot the heavy events share (training, generation, evaluation): concurrency 1."""
EVAL_METHODS = ("vanilla", "personalized", "layout", "layout-retouch")
DEFAULT_MODES = ["personalized", "layout-retouch"]


# ------------------------------------------------------------------ errors and warnings in the page


def page_message(err: BaseException) -> str:
    """What the page shows for an error: lrkit's own message for a user error, else a line saying it is a bug."""
    message = str(err) or type(err).__name__
    if is_user_error(err):
        return message
    logger.error("unexpected error in the web app", exc_info=err)
    return f"unexpected {type(err).__name__}: {message} (a bug in lrkit; the server log has the traceback)"


def _as_html(text: str) -> str:
    return html.escape(text).replace("\n", "<br>")


class _PageWarnings(logging.Handler):
    """Collects the WARNING records of lrkit's loggers while an action runs."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if message not in self.messages:
            self.messages.append(message)


@contextlib.contextmanager
def _warnings_to_page():
    handler = _PageWarnings()
    lrkit_logger = logging.getLogger("lrkit")
    lrkit_logger.addHandler(handler)
    page = True
    try:
        yield handler
    except GeneratorExit:  # the page went away: nobody to tell
        page = False
        raise
    finally:
        lrkit_logger.removeHandler(handler)
        for message in handler.messages if page else ():
            gr.Warning(_as_html(message))


def in_page(fn):
    """Wrap a handler (function or generator): errors become `gr.Error` messages, lrkit warnings `gr.Warning`s."""
    if inspect.isgeneratorfunction(fn):
        @functools.wraps(fn)
        def generator(*args, **kwargs):
            try:
                with _warnings_to_page():
                    yield from fn(*args, **kwargs)
            except gr.Error:
                raise
            except Exception as err:
                raise gr.Error(_as_html(page_message(err)), print_exception=False) from None
        return generator

    @functools.wraps(fn)
    def function(*args, **kwargs):
        try:
            with _warnings_to_page():
                return fn(*args, **kwargs)
        except gr.Error:
            raise
        except Exception as err:
            raise gr.Error(_as_html(page_message(err)), print_exception=False) from None
    return function


# ------------------------------------------------------------------ what the page shows


def training_status(state: TrainingState, job_dir: Path, name: str) -> str:
    """The Train tab's status: a progress bar over steps, the last loss, and how the run ended."""
    loss = f" · loss {state.losses[-1][1]:.4g}" if state.losses else ""
    bar = f'<progress value="{state.step}" max="{max(state.total, 1)}" style="width:100%"></progress>'
    line = f"step {state.step}/{state.total}{loss} · {state.elapsed:.0f} s"
    if state.cancelled:
        return (f"{bar}<p id='train-result'><b>Cancelled</b> at {line}. Nothing was saved: the run's folder "
                f"{html.escape(str(job_dir))} was removed and no concept {html.escape(name)!r} was written.</p>")
    if state.finished and state.bundle is not None:
        return (f"{bar}<p id='train-result'><b>Done</b>: {line}. Concept <code>{html.escape(name)}</code> saved in "
                f"{html.escape(str(state.bundle))}; it is listed in the Generate, Concepts and Evaluate tabs.</p>")
    if state.total and state.step >= state.total:
        return (f"{bar}<p>Training <code>{html.escape(name)}</code>: {line} · final validation images and the "
                "bundle…</p>")
    if not state.step:
        return f"{bar}<p>Training <code>{html.escape(name)}</code>: loading the base model and the photos… {line}</p>"
    return f"{bar}<p>Training <code>{html.escape(name)}</code>: {line}</p>"


def loss_frame(losses: list[tuple[int, float]]):
    import pandas as pd

    return pd.DataFrame({"step": [s for s, _ in losses], "loss": [v for _, v in losses]})


def _gallery(run: GenerationRun) -> list[tuple[str, str]]:
    return [(str(run.path(g.image)), g.caption) for g in run.ordered()]


# ------------------------------------------------------------------ the app


def build_app(workspace: Workspace, *, zip_limits: ZipLimits = ZipLimits()) -> gr.Blocks:
    """The page over `workspace` (call `.queue()` and `.launch()` on it, or use `launch`)."""
    from lrkit.toyworld.subjects import SUBJECTS

    ws = workspace
    generator = Generator(ws)
    board = JobBoard()
    slot = DeviceSlot()
    stops: set[str] = set()  # sessions whose generation should stop
    preset_text, preset_defaults = ws.preset("lora")
    is_toy = ws.base.split(":")[0] == "toy"

    # -------------------------------------------------------------- handlers

    @in_page
    def refresh_lists(generate_pick=None, evaluate_pick=None, concepts_pick=None, folder_pick=None):
        """The concept and photo-folder choices as the data root holds them now (each choice kept if it still is
        one), and the Concepts table."""
        names, folders = ws.concept_names(), ws.photo_folders()
        rows = [row.cells() for row in ws.concept_rows()]

        def keep(value):
            return value if value in names else (names[0] if names else None)

        return (gr.Dropdown(choices=names, value=keep(generate_pick)),
                gr.Dropdown(choices=names, value=keep(evaluate_pick)),
                gr.Dropdown(choices=names, value=keep(concepts_pick)), rows,
                gr.Dropdown(choices=folders, value=folder_pick if folder_pick in folders else None))

    @in_page
    def load_preset(method):
        text, defaults = ws.preset(method)
        return text, defaults["steps"], defaults["validation_every"]

    @in_page
    def train(photos, folder, name, class_word, method, steps, resolution, seed, token, validation_every, yaml_text,
              request: gr.Request):
        from lrkit.photos import DataError, load_images

        name, steps, resolution, seed, every = ws.check_training_form(
            name=name, class_word=class_word, method=method, steps=steps, resolution=resolution, seed=seed,
            validation_every=validation_every)
        class_word = class_word.strip()
        token = (token or "").strip() or None
        if photos and folder:
            raise UIError("give the photos one way: clear the uploaded files or the photo folder")
        if not photos and not folder:
            raise DataError("no photos: upload 3-10 photos of the subject, or pick a photo folder")
        job_dir = ws.folder("jobs") / f"{stamp()}-{name}"
        form = dict(name=name, class_word=class_word, method=method, steps=steps, resolution=resolution, seed=seed,
                    token=token, validation_every=every, output_dir=job_dir)
        ws.training_config(yaml_text, photos=Path("photos"), **form)  # a refused option costs no upload
        if photos:
            photo_dir = ws.store_photos([getattr(f, "name", f) for f in photos], stem=name, min_size=resolution // 2)
        else:
            photo_dir = ws.photo_folder(folder)
            load_images(photo_dir, min_size=resolution // 2)
        config = ws.training_config(yaml_text, photos=photo_dir, **form)
        session = request.session_hash if request is not None else "local"
        yield from wait_for_device(f"training {name}", lambda text: (text, gr.skip(), gr.skip()))
        try:
            generator.release()

            def ended():
                board.remove(session, job)
                slot.release()

            job = TrainingJob(config, job_dir, ws.folder("concepts") / name, on_end=ended)
            job.start()
        except BaseException:
            slot.release()
            raise
        board.add(session, job)
        shown = 0
        for state in job.updates():
            for message in state.warnings[shown:]:
                gr.Warning(_as_html(message))
            shown = len(state.warnings)
            validation = [(str(p), p.stem.split("_")[0]) for p in state.validation]
            yield training_status(state, job_dir, name), loss_frame(state.losses), validation
        if state.cancelled:
            gr.Warning(_as_html(f"training of {name!r} cancelled; nothing was saved"))

    def wait_for_device(what: str, shown):
        """Take the device slot; while another job holds it, show (through `shown(text)`) what it waits for."""
        if not slot.acquire(what, blocking=False):
            yield shown(f"<p>Waiting for the device: {html.escape(slot.holder or 'another job')} runs…</p>")
            slot.acquire(what)

    def cancel_training(request: gr.Request):
        session = request.session_hash if request is not None else "local"
        job = board.cancel(session)
        if job is not None:
            return (f"<p>Cancelling the training of {html.escape(job.destination.name)}: the run stops and its "
                    "folder is removed…</p>")
        gr.Warning("no training is running")
        return gr.skip()

    @in_page
    def insert_phrase(concept, prompt):
        phrase = ws.concept(concept).subject_phrase()
        prompt = (prompt or "").rstrip()
        return f"a photo of {phrase}" if not prompt else f"{prompt} {phrase}"

    def _fields(steps, guidance, negative, size, lam, vanilla_phrase, reference, mask_threshold, style_shift):
        def number(value, label, cast=float):
            if value is None or value == "":
                raise UIError(f"{label} is empty; give a number")
            return cast(value)

        size = number(size, "size", int) or None
        return {"num_inference_steps": number(steps, "steps", int), "guidance_scale": number(guidance, "guidance"),
                "negative_prompt": negative or "", "height": size, "width": size, "lam": number(lam, "λ"),
                "vanilla_phrase": (vanilla_phrase or "").strip() or None,
                "reference": number(reference, "reference photo", int),
                "mask_threshold": number(mask_threshold, "mask threshold"),
                "style_shift": number(style_shift, "style shift")}

    @in_page
    def generate(concept, prompt, modes, seeds, steps, guidance, negative, size, lam, vanilla_phrase, reference,
                 mask_threshold, style_file, style_shift, request: gr.Request):
        session = request.session_hash if request is not None else "local"
        stops.discard(session)
        seeds = parse_seeds(seeds)
        modes = [m for m in MODES if m in (modes or [])]
        style = ws.store_style(getattr(style_file, "name", style_file)) \
            if style_file and "dual-reference" in modes else None
        fields = _fields(steps, guidance, negative, size, lam, vanilla_phrase, reference, mask_threshold, style_shift)
        total = len(modes) * len(seeds)
        yield from wait_for_device(f"generation of {concept}", lambda text: (gr.skip(), text, gr.skip(), gr.skip()))
        try:
            for run in generator.run(concept, prompt, modes, seeds, fields, style, stop=lambda: session in stops):
                done = len(run.images)
                status = (f"<p id='generate-result'>{done}/{total} images · {len(modes)} modes × {len(seeds)} seeds"
                          + (f" · saved in {html.escape(str(run.folder))}</p>" if done == total else " …</p>"))
                files = [str(run.path(g.image)) for g in run.ordered()] if done == total else gr.skip()
                yield gr.Gallery(value=_gallery(run), columns=len(modes)), status, run, files
        except GenerationStopped as stopped:
            gr.Warning(_as_html(f"generation {stopped}"))
            yield [], f"<p id='generate-result'>Stopped: {html.escape(str(stopped))}.</p>", None, []
        finally:
            stops.discard(session)
            slot.release()

    def stop_generation(request: gr.Request):
        stops.add(request.session_hash if request is not None else "local")
        return "<p>Stopping after the mode being generated; its run's images will not be kept…</p>"

    @in_page
    def intermediates(index, run: GenerationRun | None):
        if run is None or not run.images:
            raise UIError("generate images first, then choose one in the gallery")
        images = run.ordered()
        if index is None or not 0 <= int(index) < len(images):
            raise UIError(f"image number must be between 0 and {len(images) - 1}")
        g = images[int(index)]
        found = {kind: str(run.path(rel)) for kind, rel in g.intermediates.items()}
        made = ", ".join(found) or "none: this mode makes no layout, mask or reference"
        note = f"<p>Image {int(index)}: {html.escape(g.caption)} · intermediates: {html.escape(made)}</p>"
        return (found.get("layout"), found.get("mask"), found.get("reference"), found.get("style"),
                str(run.path(g.image)), g.settings, note)

    def select_image(run: GenerationRun | None, evt: gr.SelectData):
        return (evt.index, *intermediates(evt.index, run))

    @in_page
    def load_settings(file):
        if not file:
            return (gr.skip(),) * 15
        values = form_values(read_settings(getattr(file, "name", file)))

        def keep(value, cast=lambda v: v):
            return gr.skip() if value is None else cast(value)

        concept = values["concept"]
        names = ws.concept_names()
        notes = []
        if concept and concept not in names:
            notes.append(f"concept {concept!r} is not in this app's concepts")
        style = values["style_reference"]
        style_value = gr.skip()
        if style:
            if Path(style).is_file() and ws.inside(style):
                style_value = style
            else:
                notes.append("its style image is not in this app's uploads; upload it again")
        status = "<p>Settings loaded from the PNG" + (": " + html.escape("; ".join(notes)) if notes else "") + ".</p>"
        return (gr.Dropdown(choices=names, value=concept) if concept in names else gr.skip(),
                values["prompt"], [values["mode"]] if values["mode"] in MODES else gr.skip(),
                keep(values["seed"], str), keep(values["num_inference_steps"]), keep(values["guidance_scale"]),
                keep(values["negative_prompt"]), keep(values["size"]), keep(values["lam"]),
                keep(values["vanilla_phrase"]), keep(values["reference"]), keep(values["mask_threshold"]),
                style_value, keep(values["style_shift"]), status)

    @in_page
    def concept_details(name):
        if not name:
            return "<p>No concept yet: train one, or import a bundle zip.</p>", [], None
        c = ws.concept(name)
        return ws.summary(name), [str(p) for p in c.ref_paths()], c.to_manifest()

    @in_page
    def kohya_file(name):
        return str(ws.kohya_file(name))

    @in_page
    def export_zip(name):
        return str(ws.export_zip(name))

    @in_page
    def import_zip(file):
        concept = ws.import_zip(getattr(file, "name", file) if file else None, zip_limits)
        return (f"<p id='import-result'>Imported <code>{html.escape(concept.name)}</code> "
                f"({html.escape(concept.method)}) into {html.escape(str(concept.path))}.</p>")

    @in_page
    def evaluate(concept, subject, methods, seeds, max_prompts, steps, progress=gr.Progress(track_tqdm=True)):
        from lrkit.evaluation.cli import parse_seeds as eval_seeds

        methods = [m for m in EVAL_METHODS if m in (methods or [])]
        seeds = eval_seeds(str(seeds))
        slot.acquire(f"evaluation of {concept}")
        try:
            result = ws.evaluate(concept, subject=subject or None, methods=methods, seeds=seeds,
                                 max_prompts=int(max_prompts), steps=int(steps))
        finally:
            slot.release()
        plots = [(str(p), p.stem.replace("_", " ")) for p in result.plots]
        tables = result.markdown.split("\n", 1)[1] if "\n" in result.markdown else result.markdown
        return tables, plots, f"<p id='eval-result'>Results in {html.escape(str(result.out))}</p>"

    # -------------------------------------------------------------- layout

    names = ws.concept_names()
    first = names[0] if names else None
    heavy = dict(concurrency_limit=1, concurrency_id=DEVICE)
    with gr.Blocks(title="lrkit", analytics_enabled=False, delete_cache=(3600, 24 * 3600)) as demo:
        gr.Markdown(f"**lrkit** — photos → concept → Layout-and-Retouch · base `{ws.base}` · "
                    f"device `{ws.device}` · data root `{ws.root}`")
        with gr.Tabs():
            with gr.Tab("Train", id="train", elem_id="tab-train") as train_tab:
                with gr.Row():
                    with gr.Column(scale=3):
                        with gr.Row():
                            photos = gr.File(label="Photos of the subject (.jpg .png .webp; same-name .txt captions)",
                                             file_count="multiple", file_types=["image", ".txt"], height=190,
                                             scale=3, elem_id="train-photos")
                            with gr.Column(scale=2, min_width=200):
                                folder = gr.Dropdown(label="…or a photo folder under uploads/",
                                                     choices=ws.photo_folders(), value=None, elem_id="train-folder",
                                                     allow_custom_value=True)
                                name = gr.Textbox(label="Concept name", placeholder="my-dog", elem_id="train-name")
                                class_word = gr.Textbox(label="Class word", placeholder="dog", elem_id="train-class")
                        with gr.Row():
                            method = gr.Dropdown(label="Method", choices=list(TRAIN_METHODS), value="lora",
                                                 min_width=150, elem_id="train-method")
                            token = gr.Textbox(label="Token (blank: default)", placeholder="sks", min_width=110,
                                               elem_id="train-token")
                            steps = gr.Number(label="Steps", value=preset_defaults["steps"], precision=0, minimum=1,
                                              min_width=90, elem_id="train-steps")
                            resolution = gr.Number(label="Resolution", value=preset_defaults["resolution"], precision=0,
                                                   minimum=8, step=8, min_width=90, elem_id="train-resolution")
                            seed = gr.Number(label="Seed", value=0, precision=0, minimum=0, min_width=80)
                            every = gr.Number(label="Validate every N steps", value=preset_defaults["validation_every"],
                                              precision=0, minimum=0, min_width=110, elem_id="train-every")
                        preset = gr.Code(value=preset_text, language="yaml", lines=9, max_lines=9, interactive=True,
                                         label="Config preset (configs/train/<method>.yaml): every other option",
                                         elem_id="train-yaml")
                        with gr.Row():
                            train_btn = gr.Button("Train", variant="primary", elem_id="train-button")
                            cancel_btn = gr.Button("Cancel", variant="stop", elem_id="train-cancel")
                    with gr.Column(scale=2):
                        train_status = gr.HTML("<p>Upload photos, name the concept, press Train.</p>",
                                               elem_id="train-status")
                        loss_plot = gr.LinePlot(loss_frame([]), x="step", y="loss", title="training loss",
                                                height=250, elem_id="train-loss")
                        validation = gr.Gallery(label="Validation images (file name: the step)", columns=4,
                                                height=200, elem_id="train-validation")

            with gr.Tab("Generate", id="generate", elem_id="tab-generate") as generate_tab:
                with gr.Row():
                    with gr.Column(scale=2):
                        gen_concept = gr.Dropdown(label="Concept", choices=names, value=first, elem_id="gen-concept",
                                                  allow_custom_value=True)
                        with gr.Row():
                            prompt = gr.Textbox(label="Prompt ('{}' stands for the concept's phrase)",
                                                value="a photo of {} on the beach", scale=4, elem_id="gen-prompt")
                            phrase_btn = gr.Button("Insert concept phrase", scale=1, elem_id="gen-phrase")
                        modes = gr.CheckboxGroup(label="Modes", choices=list(MODES), value=DEFAULT_MODES,
                                                 elem_id="gen-modes")
                        with gr.Row():
                            seeds = gr.Textbox(label="Seeds (0, 5, 7 or a range 0-3)", value="0, 1",
                                               elem_id="gen-seeds")
                            gen_steps = gr.Number(label="Steps", value=50, precision=0, minimum=1, elem_id="gen-steps")
                            guidance = gr.Number(label="Guidance scale", value=7.5, minimum=0)
                            size = gr.Number(label="Size (0: the concept's resolution)", value=0, precision=0,
                                             minimum=0, step=8)
                        lam = gr.Slider(label="λ: fraction of steps the vanilla model draws (layout modes)",
                                        minimum=0, maximum=1, value=0.3, step=0.05, elem_id="gen-lam")
                        with gr.Accordion("More options", open=False):
                            negative = gr.Textbox(label="Negative prompt", value="")
                            vanilla_phrase = gr.Textbox(label="Vanilla phrase (default: the class word)", value="")
                            with gr.Row():
                                reference = gr.Number(label="Reference photo (index)", value=0, precision=0, minimum=0)
                                mask_threshold = gr.Slider(label="Mask threshold", minimum=0, maximum=1, value=0.5,
                                                           step=0.05)
                            style_file = gr.File(label="Style image (dual-reference)", file_types=["image"],
                                                 elem_id="gen-style")
                            style_shift = gr.Slider(label="Style shift (dual-reference; 0: off)", minimum=0, maximum=1,
                                                    value=0.0, step=0.05)
                        with gr.Row():
                            gen_btn = gr.Button("Generate", variant="primary", elem_id="gen-button")
                            stop_btn = gr.Button("Stop", variant="stop")
                        settings_png = gr.File(label="Drop a PNG made here (or by A1111) to load its settings",
                                               file_types=[".png"], elem_id="gen-drop")
                    with gr.Column(scale=3):
                        gen_status = gr.HTML("", elem_id="gen-status")
                        gallery = gr.Gallery(label="Images: one row per seed, the modes side by side", columns=2,
                                             height=380, object_fit="contain", elem_id="gen-gallery",
                                             buttons=["download", "download_all", "fullscreen"])
                        with gr.Row():
                            index = gr.Number(label="Image number", value=0, precision=0, minimum=0, scale=1)
                            show_btn = gr.Button("Show layout, mask and reference", scale=2)
                        note = gr.HTML("")
                        with gr.Row():
                            layout_img = gr.Image(label="Layout", type="filepath", height=160, interactive=False)
                            mask_img = gr.Image(label="Mask", type="filepath", height=160, interactive=False)
                            ref_img = gr.Image(label="Reference", type="filepath", height=160, interactive=False)
                            style_img = gr.Image(label="Style", type="filepath", height=160, interactive=False)
                        png_file = gr.File(label="PNG of this image (its settings inside)")
                        settings_json = gr.JSON(label="Settings of this image")
                        downloads = gr.File(label="All PNGs of the run", file_count="multiple")
                run_state = gr.State(None)

            with gr.Tab("Concepts", id="concepts", elem_id="tab-concepts") as concepts_tab:
                table = gr.Dataframe(headers=ROW_HEADERS, value=[r.cells() for r in ws.concept_rows()],
                                     interactive=False, elem_id="concepts-table")
                with gr.Row():
                    with gr.Column():
                        pick = gr.Dropdown(label="Concept", choices=names, value=first, elem_id="concepts-pick",
                                           allow_custom_value=True)
                        summary = gr.Markdown()
                        refs = gr.Gallery(label="Reference photos", columns=5, height=140)
                        with gr.Row():
                            kohya_btn = gr.Button("Download kohya LoRA (ComfyUI / A1111)")
                            zip_btn = gr.Button("Download bundle zip")
                        download = gr.File(label="Download")
                    with gr.Column():
                        manifest = gr.JSON(label="Manifest (concept.json)")
                        zip_in = gr.File(label="Import a bundle zip", file_types=[".zip"], elem_id="concepts-zip")
                        import_btn = gr.Button("Import", elem_id="concepts-import")
                        import_status = gr.HTML("")

            with gr.Tab("Evaluate", id="evaluate", elem_id="tab-evaluate") as evaluate_tab:
                if not is_toy:
                    gr.Markdown(f"The toy-world scores need the toy base (`lrkit ui --base toy`); this app runs "
                                f"`{ws.base}`. Use `lrkit eval` for CLIP-I, CLIP-T, DINO and layout diversity.")
                with gr.Row():
                    with gr.Column(scale=2):
                        eval_concept = gr.Dropdown(label="Concept", choices=names, value=first, elem_id="eval-concept",
                                                   allow_custom_value=True)
                        subject = gr.Dropdown(label="Toy subject it shows (identity scores)", value=None,
                                              elem_id="eval-subject",
                                              choices=[("(its name, if a toy subject)", "")] + sorted(SUBJECTS))
                        eval_methods = gr.CheckboxGroup(label="Modes", choices=list(EVAL_METHODS),
                                                        value=["personalized", "layout-retouch"])
                        with gr.Row():
                            eval_seeds = gr.Textbox(label="Seeds (a count N: 0..N-1, or a list 0,5,7)", value="4",
                                                    elem_id="eval-seeds")
                            max_prompts = gr.Number(label="Prompts (toy scenes)", value=3, precision=0, minimum=1,
                                                    elem_id="eval-prompts")
                            eval_steps = gr.Number(label="Steps", value=25, precision=0, minimum=1,
                                                   elem_id="eval-steps")
                        eval_btn = gr.Button("Evaluate", variant="primary", elem_id="eval-button",
                                             interactive=is_toy)
                        eval_status = gr.HTML("")
                    with gr.Column(scale=3):
                        eval_table = gr.Markdown(elem_id="eval-table")
                        plots = gr.Gallery(label="Bar charts and centre heatmaps", columns=3, height="auto",
                                           object_fit="contain", elem_id="eval-plots")

        # ---------------------------------------------------------- wiring

        lists = [gen_concept, eval_concept, pick, table, folder]
        picks = [gen_concept, eval_concept, pick, folder]
        demo.load(refresh_lists, outputs=lists, api_name="refresh", queue=False)
        for tab in (train_tab, generate_tab, concepts_tab, evaluate_tab):
            tab.select(refresh_lists, inputs=picks, outputs=lists, api_visibility="private", queue=False)

        method.change(load_preset, inputs=method, outputs=[preset, steps, every], api_name="preset")
        train_event = train_btn.click(
            train, inputs=[photos, folder, name, class_word, method, steps, resolution, seed, token, every, preset],
            outputs=[train_status, loss_plot, validation], api_name="train", show_progress="minimal", **heavy)
        train_event.then(refresh_lists, inputs=picks, outputs=lists, api_visibility="private")
        cancel_btn.click(cancel_training, outputs=train_status, api_name="cancel_training", queue=False)

        phrase_btn.click(insert_phrase, inputs=[gen_concept, prompt], outputs=prompt, api_name="insert_phrase")
        gen_inputs = [gen_concept, prompt, modes, seeds, gen_steps, guidance, negative, size, lam, vanilla_phrase,
                      reference, mask_threshold, style_file, style_shift]
        gen_btn.click(generate, inputs=gen_inputs, outputs=[gallery, gen_status, run_state, downloads],
                      api_name="generate", show_progress="minimal", **heavy)
        stop_btn.click(stop_generation, outputs=gen_status, api_name="stop_generation", queue=False)
        detail_outputs = [layout_img, mask_img, ref_img, style_img, png_file, settings_json, note]
        show_btn.click(intermediates, inputs=[index, run_state], outputs=detail_outputs, api_name="intermediates")
        gallery.select(select_image, inputs=run_state, outputs=[index, *detail_outputs], api_visibility="private")
        settings_png.upload(load_settings, inputs=settings_png,
                            outputs=[gen_concept, prompt, modes, seeds, gen_steps, guidance, negative, size, lam,
                                     vanilla_phrase, reference, mask_threshold, style_file, style_shift, gen_status],
                            api_name="read_settings")

        pick.change(concept_details, inputs=pick, outputs=[summary, refs, manifest], api_name="concept_details")
        kohya_btn.click(kohya_file, inputs=pick, outputs=download, api_name="kohya_file")
        zip_btn.click(export_zip, inputs=pick, outputs=download, api_name="export_zip")
        import_event = import_btn.click(import_zip, inputs=zip_in, outputs=import_status, api_name="import_zip")
        import_event.then(refresh_lists, inputs=picks, outputs=lists, api_visibility="private")

        eval_btn.click(evaluate, inputs=[eval_concept, subject, eval_methods, eval_seeds, max_prompts, eval_steps],
                       outputs=[eval_table, plots, eval_status], api_name="evaluate", **heavy)
        demo.load(concept_details, inputs=pick, outputs=[summary, refs, manifest], api_visibility="private")
    return demo


# ------------------------------------------------------------------ launching


def exposure_warning(host: str, share: bool, auth) -> str | None:
    """What to tell the user when the app is reachable from other machines (None when it is not)."""
    loopback = host in ("127.0.0.1", "localhost", "::1") or host.startswith("127.")
    if loopback and not share:
        return None
    anywhere = host in ("0.0.0.0", "::", "")
    where = [] if loopback else ["every machine that can reach this one (all its network addresses)" if anywhere
                                 else f"every machine that can reach {host}"]
    if share:
        where.append("anyone with the public *.gradio.live link (a tunnel through Gradio's share servers)")
    guard = ("the --auth user and password" if auth else
             "nothing: no --auth is set, so anyone who reaches it can use it")
    return (f"warning: the app is reachable by {' and by '.join(where)}. Whoever reaches it can upload files, "
            f"train and generate on this machine's device, and download every concept and image under the data "
            f"root; guarding it: {guard}. For your own use elsewhere, keep --host 127.0.0.1 and open an SSH tunnel "
            "(ssh -L 7860:127.0.0.1:7860 host) instead.")


def parse_auth(text: str | None) -> tuple[str, str] | None:
    """`user:pass` -> (user, pass); both must be non-empty."""
    if text is None:
        return None
    user, sep, password = text.partition(":")
    if not sep or not user or not password:
        raise ValueError("--auth must be USER:PASSWORD, both non-empty")
    return user, password


def launch(*, base: str = "toy", root: str | os.PathLike = "lrkit-ui", host: str = "127.0.0.1", port: int = 7860,
           share: bool = False, auth: tuple[str, str] | None = None, device: str | None = None,
           prevent_thread_lock: bool = False, zip_limits: ZipLimits = ZipLimits()):
    """Build the page over a workspace at `root` and serve it; returns (demo, url). Gradio's upload cache goes to
    ROOT/tmp/gradio unless GRADIO_TEMP_DIR names another place."""
    ws = Workspace(root, base=base, device=device)
    os.environ.setdefault("GRADIO_TEMP_DIR", str(ws.folder("tmp") / "gradio"))
    demo = build_app(ws, zip_limits=zip_limits)
    demo.queue(default_concurrency_limit=4)
    _, url, _ = demo.launch(server_name=host, server_port=port, share=share, auth=auth, quiet=False,
                            max_file_size=zip_limits.max_zip_bytes, prevent_thread_lock=prevent_thread_lock,
                            footer_links=["api"])
    return demo, url


__all__ = ["DEVICE", "build_app", "exposure_warning", "launch", "page_message", "parse_auth"]
