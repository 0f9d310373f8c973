"""onnxcomp on real pretrained models: RapidOCR's PP-OCRv4 det/rec and PP-OCR mobile v2 cls.

The three ONNX models ship inside the ``rapidocr-onnxruntime`` wheel on PyPI, so
nothing comes from a model hub: the script downloads the wheel with pip, unpacks
the models (and the recogniser's character dictionary, stored in the rec model's
``metadata_props``) under ``benchmarks/.cache/``, renders text images with known
ground truth with Pillow and the machine's TrueType fonts, checks that the
original models read them well, then compresses each model at each budget and
prints a markdown table of the task metric, the output error and the latency.

    python benchmarks/ppocr.py [--methods svd tucker2 cp] [--budgets 0.75 0.5] [--models det] [--quick] [--plot out.png]

Needs Pillow and SciPy (``pip install pillow``; matplotlib only for ``--plot``).

Inputs (all rendered from a seeded RNG; calibration and held-out sets are disjoint):

- rec: one text line of random words / numbers, preprocessed like RapidOCR
  (BGR, height 48, width ceil(48 * w / h) padded with zeros to 320, (x/255 - 0.5)/0.5, NCHW).
  Metric: CTC greedy decode with the dictionary (index 0 blank, the dictionary,
  then " " appended, as RapidOCR's CTCLabelDecode), character accuracy
  1 - edit distance / max(len) averaged over lines, and exact-line accuracy;
  spaces are ignored in both, as PaddleOCR's RecMetric does by default.
- cls: the same kind of lines, rotated 180 degrees or not, 48x192 like RapidOCR.
  Metric: direction accuracy.
- det: pages with several lines at known boxes (ink bounding boxes), sized to
  multiples of 32, normalised like RapidOCR 1.4.4's det config (mean = std = 0.5).
  Metric: box hit rate: probability map > 0.3, connected components
  (scipy.ndimage.label), each component's bounding box grown by DB's unclip
  distance (area * 1.6 / perimeter, RapidOCR's unclip_ratio) since DB predicts
  shrunk text kernels; a ground-truth box is hit when some component's box has
  IoU >= 0.5 with it.
"""

from __future__ import annotations

import argparse
import datetime
import glob
import math
import os
import platform
import shutil
import subprocess
import sys
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

import onnxcomp
from onnxcomp.bench import bench
from onnxcomp.calibration.holdout import held_out_mask
from onnxcomp.errors import first_line
from onnxcomp.model import count_macs
from onnxcomp.runtime import make_session

try:
    from PIL import Image, ImageDraw, ImageFont
except ImportError:  # pragma: no cover
    sys.exit("benchmarks/ppocr.py needs Pillow: pip install pillow")
from scipy import ndimage

WHEEL = "rapidocr-onnxruntime==1.4.4"
CACHE = Path(__file__).resolve().parent / ".cache" / "rapidocr-onnxruntime-1.4.4"

REC_H, REC_W = 48, 320
CLS_H, CLS_W = 48, 192
PAGE_H, PAGE_W = 480, 640  # multiples of 32: the det model's input size
DET_MEAN = DET_STD = 0.5  # RapidOCR 1.4.4 config.yaml, Det: mean/std [0.5, 0.5, 0.5]
DET_THRESH, UNCLIP_RATIO, HIT_IOU = 0.3, 1.6, 0.5

WORDS = """
the of and to in is was for on are with as be at by this have from or had not but what all were when we
there can an your which their said if do will each about how up out them then she many some so these would
other into has more her two like him see time could no make than first been its who now people my made over
did down only way find use may water long little very after words called just where most know get through
back much before go good new write our used me man too any day same right look think also around another
came come work three word must because does part even place well such here take why things help put years
different away again off went old number great tell men say small every found still between name should home
big give air line set own under read last never us left end along while might next sound below saw something
thought both few those always looked show large often together asked house world going want school important
until form food keep children feet land side without boy once animals life enough took sometimes four head
above kind began almost live page got earth need far hand high year mother light parts country father let night
following picture being study second eyes soon times story boys since white days ever paper hard near sentence
better best across during today others however sure means knew its try told young miles sun ways thing whole
hear example heard several change answer room sea against top turned learn point city play toward five using
himself usually money seen car morning river invoice total amount date order price account street station
""".split()
PUNCT = ".,:-/"


# ---------------------------------------------------------------- models


@dataclass
class Models:
    det: Path
    rec: Path
    cls: Path
    characters: list  # the rec dictionary, without the blank and the appended space


def fetch_models() -> Models:
    """Download the wheel once, unpack its .onnx files (and any .txt dictionary) into the cache."""
    models_dir = CACHE / "models"
    if not list(models_dir.glob("*.onnx")):
        wheel_dir = CACHE / "wheel"
        wheels = sorted(wheel_dir.glob("rapidocr_onnxruntime-1.4.4-*.whl"))
        if not wheels:
            wheel_dir.mkdir(parents=True, exist_ok=True)
            print(f"downloading {WHEEL} with pip ...", file=sys.stderr)
            subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", WHEEL, "-d", str(wheel_dir)],
                           check=True, stdout=subprocess.DEVNULL)
            wheels = sorted(wheel_dir.glob("rapidocr_onnxruntime-1.4.4-*.whl"))
        staging = CACHE / "models.partial"
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        with zipfile.ZipFile(wheels[0]) as archive:
            for name in archive.namelist():
                if name.endswith((".onnx", ".txt", ".yaml")) and ".dist-info/" not in name:
                    (staging / Path(name).name).write_bytes(archive.read(name))
        shutil.rmtree(models_dir, ignore_errors=True)
        staging.rename(models_dir)

    def one(pattern: str) -> Path:
        found = sorted(models_dir.glob(pattern))
        if len(found) != 1:
            sys.exit(f"expected one model matching {pattern!r} in {models_dir}, found {[p.name for p in found]}")
        return found[0]

    rec = one("*PP-OCRv4_rec*.onnx")
    return Models(one("*PP-OCRv4_det*.onnx"), rec, one("*mobile_v2*cls*.onnx"), _dictionary(rec, models_dir))


def _dictionary(rec: Path, models_dir: Path) -> list:
    meta = {p.key: p.value for p in onnx.load(str(rec), load_external_data=False).metadata_props}
    if "character" in meta:  # RapidOCR reads it from here when present (OrtInferSession.get_character_list)
        return meta["character"].splitlines()
    texts = sorted(models_dir.glob("*keys*.txt")) + sorted(models_dir.glob("*dict*.txt"))
    if not texts:
        sys.exit("no character dictionary in the rec model's metadata nor in the wheel")
    return texts[0].read_text(encoding="utf-8").splitlines()


# ---------------------------------------------------------------- rendering


def find_fonts() -> list:
    """Latin TrueType fonts of the machine (fc-list, else /usr/share/fonts); [] means Pillow's default."""
    paths = []
    if shutil.which("fc-list"):
        out = subprocess.run(["fc-list", ":lang=en", "file"], capture_output=True, text=True).stdout
        paths = [line.split(":")[0].strip() for line in out.splitlines() if line.strip()]
    if not paths:
        paths = [path for pattern in ("*.ttf", "*.otf")
                 for path in glob.glob(f"/usr/share/fonts/**/{pattern}", recursive=True)]
    skip = ("math", "symbol", "emoji", "extralight", "thin", "icon", "awesome", "dingbat")
    fonts = (p for p in set(paths) if p.lower().endswith((".ttf", ".otf")))
    return sorted(p for p in fonts if not any(s in p.lower() for s in skip))


class Renderer:
    def __init__(self, seed: int, fonts: list, characters: set):
        self.rng = np.random.default_rng(seed)
        self.fonts = fonts
        self.characters = characters
        self._cache = {}

    def font(self, size: int):
        path = self.fonts[self.rng.integers(len(self.fonts))] if self.fonts else None
        key = (path, size)
        if key not in self._cache:
            self._cache[key] = ImageFont.truetype(path, size) if path else ImageFont.load_default(size=size)
        return self._cache[key]

    def token(self) -> str:
        r = self.rng.random()
        if r < 0.6:
            word = WORDS[self.rng.integers(len(WORDS))]
            style = self.rng.random()
            return word.capitalize() if style < 0.3 else word.upper() if style < 0.4 else word
        if r < 0.85:
            return "".join(str(d) for d in self.rng.integers(0, 10, self.rng.integers(1, 7)))
        a, b = self.rng.integers(0, 100, 2)
        return f"{a}{PUNCT[self.rng.integers(len(PUNCT))]}{b:02d}"

    def text(self, max_tokens: int = 3) -> str:
        text = " ".join(self.token() for _ in range(self.rng.integers(1, max_tokens + 1)))
        assert all(c in self.characters or c == " " for c in text), text
        return text

    def colours(self):
        paper = int(self.rng.integers(190, 256))
        tint = self.rng.integers(-15, 16, 3)
        ink = int(self.rng.integers(0, 90))
        background = tuple(int(np.clip(paper + t, 0, 255)) for t in tint)
        return background, (ink, ink, int(np.clip(ink + self.rng.integers(0, 40), 0, 255)))

    def noisy(self, image: Image.Image) -> np.ndarray:
        """HWC uint8 in BGR order (RapidOCR reads images with OpenCV), with mild sensor noise."""
        array = np.asarray(image, dtype=np.float32)
        array = array + self.rng.normal(0, self.rng.uniform(0, 6), array.shape)
        return np.clip(array, 0, 255).astype(np.uint8)[:, :, ::-1]

    def line(self, max_ratio: float) -> tuple[np.ndarray, str]:
        """A cropped text line whose width / height is at most max_ratio."""
        while True:
            text = self.text()
            font = self.font(int(self.rng.integers(26, 41)))
            left, top, right, bottom = font.getbbox(text)
            mx, my = int(self.rng.integers(3, 12)), int(self.rng.integers(2, 8))
            w, h = right - left + 2 * mx, bottom - top + 2 * my
            if w / h <= max_ratio:
                break
        background, ink = self.colours()
        image = Image.new("RGB", (w, h), background)
        ImageDraw.Draw(image).text((mx - left, my - top), text, font=font, fill=ink)
        return self.noisy(image), text

    def page(self, lines: int) -> tuple[np.ndarray, list]:
        """A PAGE_H x PAGE_W page with text lines at non-overlapping places; boxes (x0, y0, x1, y1) of the ink."""
        background, ink = self.colours()
        image = Image.new("RGB", (PAGE_W, PAGE_H), background)
        draw = ImageDraw.Draw(image)
        boxes = []
        for _ in range(200):
            if len(boxes) == lines:
                break
            text = self.text(max_tokens=4)
            font = self.font(int(self.rng.integers(26, 45)))
            left, top, right, bottom = font.getbbox(text)
            w, h = right - left, bottom - top
            if w > PAGE_W - 40:
                continue
            x, y = int(self.rng.integers(20, PAGE_W - 20 - w)), int(self.rng.integers(20, PAGE_H - 20 - h))
            box = (x, y, x + w, y + h)
            if any(_overlaps(box, other, margin=12) for other in boxes):
                continue
            draw.text((x - left, y - top), text, font=font, fill=ink)
            boxes.append(box)
        return self.noisy(image), boxes


def _overlaps(a, b, margin: int) -> bool:
    return not (a[2] + margin <= b[0] or b[2] + margin <= a[0] or a[3] + margin <= b[1] or b[3] + margin <= a[1])


def resize_pad(bgr: np.ndarray, height: int, width: int) -> np.ndarray:
    """RapidOCR's rec/cls resize_norm_img: height fixed, width ceil(h * ratio) capped, zero padding, CHW."""
    h, w = bgr.shape[:2]
    new_w = min(width, int(math.ceil(height * w / h)))
    resized = np.asarray(Image.fromarray(bgr).resize((new_w, height), Image.BILINEAR), dtype=np.float32)
    out = np.zeros((3, height, width), dtype=np.float32)
    out[:, :, :new_w] = (resized.transpose(2, 0, 1) / 255 - 0.5) / 0.5
    return out


def det_input(bgr: np.ndarray) -> np.ndarray:
    return ((bgr.astype(np.float32) / 255 - DET_MEAN) / DET_STD).transpose(2, 0, 1)


# ---------------------------------------------------------------- tasks


@dataclass
class Task:
    name: str
    path: Path
    shape: list  # per-sample input shape, batch 1
    calib: np.ndarray
    held: np.ndarray
    truth: object
    metric_name: str
    calib_batch: int
    skip: list = field(default_factory=list)

    def score(self, outputs: np.ndarray) -> dict:
        return SCORERS[self.name](outputs, self.truth)


def make_tasks(models: Models, which: list, n_calib: int, n_held: int, pages_calib: int, pages_held: int,
               seed: int) -> list:
    fonts = find_fonts()
    characters = set(models.characters)
    tasks = []
    for name in which:
        # Separate seeds: calibration and held-out inputs are drawn independently.
        offset = {"rec": 0, "cls": 100, "det": 200}[name]
        calib_r, held_r = (Renderer(seed + 1000 * k + offset, fonts, characters) for k in (1, 2))
        if name == "rec":
            def lines(r, n):
                pairs = [r.line(REC_W / REC_H) for _ in range(n)]
                return np.stack([resize_pad(img, REC_H, REC_W) for img, _ in pairs]), [t for _, t in pairs]
            calib, _ = lines(calib_r, n_calib)
            held, texts = lines(held_r, n_held)
            truth = {"texts": texts, "characters": ["blank", *models.characters, " "]}
            tasks.append(Task("rec", models.rec, [1, 3, REC_H, REC_W], calib, held, truth,
                              "char acc / line acc", calib_batch=16))
        elif name == "cls":
            def lines(r, n):
                xs, ys = [], []
                for _ in range(n):
                    img, _ = r.line(REC_W / REC_H)
                    flip = int(r.rng.random() < 0.5)
                    xs.append(resize_pad(np.ascontiguousarray(img[::-1, ::-1]) if flip else img, CLS_H, CLS_W))
                    ys.append(flip)
                return np.stack(xs), np.array(ys)
            calib, _ = lines(calib_r, n_calib)
            held, labels = lines(held_r, n_held)
            tasks.append(Task("cls", models.cls, [1, 3, CLS_H, CLS_W], calib, held, labels,
                              "direction acc", calib_batch=32))
        elif name == "det":
            def pages(r, n):
                made = [r.page(int(r.rng.integers(4, 9))) for _ in range(n)]
                return np.stack([det_input(img) for img, _ in made]), [b for _, b in made]
            calib, _ = pages(calib_r, pages_calib)
            held, boxes = pages(held_r, pages_held)
            tasks.append(Task("det", models.det, [1, 3, PAGE_H, PAGE_W], calib, held, boxes,
                              "box hit rate", calib_batch=4))
    return tasks


def ctc_greedy(probs: np.ndarray, characters: list) -> list:
    """RapidOCR's CTCLabelDecode without the scores: argmax, merge repeats, drop the blank (index 0)."""
    texts = []
    for row in probs.argmax(axis=2):
        keep = np.ones(len(row), dtype=bool)
        keep[1:] = row[1:] != row[:-1]
        keep &= row != 0
        texts.append("".join(characters[i] for i in row[keep]))
    return texts


def edit_distance(a: str, b: str) -> int:
    previous = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        current = [i]
        for j, cb in enumerate(b, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (ca != cb)))
        previous = current
    return previous[-1]


def score_rec(probs: np.ndarray, truth: dict) -> dict:
    predicted = ctc_greedy(probs, truth["characters"])
    chars, exact, exact_spaces = [], [], []
    for p, t in zip(predicted, truth["texts"]):
        exact_spaces.append(p == t)
        p, t = p.replace(" ", ""), t.replace(" ", "")  # PaddleOCR RecMetric(ignore_space=True)
        chars.append(1 - edit_distance(p, t) / max(len(p), len(t), 1))
        exact.append(p == t)
    return {"value": float(np.mean(chars)), "line": float(np.mean(exact)),
            "line_with_spaces": float(np.mean(exact_spaces)), "examples": list(zip(predicted[:4], truth["texts"][:4]))}


def score_cls(probs: np.ndarray, labels: np.ndarray) -> dict:
    return {"value": float(np.mean(probs.argmax(axis=1) == labels))}


def _components(prob: np.ndarray) -> list:
    labels, _ = ndimage.label(prob > DET_THRESH)
    boxes = []
    for rows, cols in ndimage.find_objects(labels):
        x0, y0, x1, y1 = cols.start, rows.start, cols.stop, rows.stop
        w, h = x1 - x0, y1 - y0
        if min(w, h) < 3:  # DBPostProcess.min_size
            continue
        d = w * h * UNCLIP_RATIO / (2 * (w + h))  # DB's unclip distance for a rectangle
        boxes.append((x0 - d, y0 - d, x1 + d, y1 + d))
    return boxes


def iou(a, b) -> float:
    w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = w * h
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def score_det(probs: np.ndarray, pages: list) -> dict:
    hits = total = components = matched = 0
    for prob, truth in zip(probs[:, 0], pages):
        found = _components(prob)
        components += len(found)
        matched += sum(any(iou(f, t) >= HIT_IOU for t in truth) for f in found)
        hits += sum(any(iou(f, t) >= HIT_IOU for f in found) for t in truth)
        total += len(truth)
    return {"value": hits / total, "precision": matched / max(components, 1), "boxes": total}


SCORERS = {"rec": score_rec, "cls": score_cls, "det": score_det}


def fold_dynamic_reshapes(model: onnx.ModelProto, shape: list) -> tuple[onnx.ModelProto, int]:
    """WORKAROUND (library limitation, see PPOCR_RESULTS.md): Paddle2ONNX computes Reshape targets at run
    time (Shape -> Cast -> Slice -> Cast -> Concat); ONNX shape inference cannot see through the Casts, so
    onnxcomp cannot count the MACs and refuses target_macs. Replace each such target by a constant for the
    benchmark's input size, with 0 (copy the input's dim) where it follows the batch; drop the dead shape nodes.
    The function is unchanged (checked by the caller)."""
    producers = {o: n for n in model.graph.node for o in n.output}
    reshapes = [n for n in model.graph.node if n.op_type == "Reshape"
                and n.input[1] in producers and producers[n.input[1]].op_type != "Constant"]
    if not reshapes:
        return model, 0
    probe = onnx.ModelProto.FromString(model.SerializeToString())
    names = sorted({n.input[1] for n in reshapes})
    probe.graph.output.extend(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.INT64, None) for name in names)
    session = ort.InferenceSession(probe.SerializeToString(), providers=["CPUExecutionProvider"])
    feed = session.get_inputs()[0].name
    at = [dict(zip(names, session.run(names, {feed: np.zeros([b, *shape[1:]], np.float32)}))) for b in (1, 2)]
    folded = onnx.ModelProto.FromString(model.SerializeToString())
    constants, count = [], 0
    for node in folded.graph.node:
        if node.op_type != "Reshape" or node.input[1] not in at[0]:
            continue
        one, two = at[0][node.input[1]], at[1][node.input[1]]
        batch = one != two
        if batch.sum() > 1 or (batch.any() and not batch[0]):
            continue
        value = np.where(batch, 0, one).astype(np.int64)  # Reshape's 0: copy the input's dim 0 (the batch)
        name = f"{node.input[1]}__folded_{count}"
        constants.append(onnx.helper.make_node("Constant", [], [name], value=onnx.numpy_helper.from_array(value)))
        node.input[1] = name
        count += 1
    nodes = constants + list(folded.graph.node)
    needed = {o.name for o in folded.graph.output}
    kept = []
    for node in reversed(nodes):  # drop what no longer feeds anything
        if any(o in needed for o in node.output):
            kept.append(node)
            needed.update(i for i in node.input if i)
    del folded.graph.node[:]
    folded.graph.node.extend(reversed(kept))
    return folded, count


def run(model, data: np.ndarray, threads: int, batch: int = 8) -> np.ndarray:
    session = make_session(model, threads=threads)
    name = session.get_inputs()[0].name
    return np.concatenate([session.run(None, {name: data[i:i + batch]})[0] for i in range(0, len(data), batch)])


def fmt_metric(task: Task, m: dict) -> str:
    if task.name == "rec":
        return f"{m['value']:.3f} / {m['line']:.2f}"
    return f"{m['value']:.3f}"


# ---------------------------------------------------------------- main


def header(args) -> list:
    return [
        f"# onnxcomp on RapidOCR {WHEEL.split('==')[1]} models (PP-OCRv4 det/rec, PP-OCR mobile v2 cls)",
        "",
        f"- date: {datetime.datetime.now().strftime('%Y-%m-%d %H:%M')}",
        f"- machine: {platform.platform()}, {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} CPUs; python {platform.python_version()}",
        f"- versions: onnxcomp {onnxcomp.__version__}, onnx {onnx.__version__}, onnxruntime {ort.__version__}, "
        f"numpy {np.__version__}",
        f"- command: python benchmarks/ppocr.py {' '.join(sys.argv[1:])}".rstrip(),
        f"- latency: onnxcomp.bench.bench at batch 1, {args.threads} intra-op thread(s), "
        f"{args.repeats} interleaved pairs after {args.warmup} warm-up pairs; ratio = compressed / original (median)",
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="+", default=["svd"], choices=["svd", "tucker2", "cp", "auto"])
    parser.add_argument("--budgets", type=float, nargs="+", default=[0.75, 0.5])
    parser.add_argument("--cp-form", default="4way", choices=["4way", "3way"],
                        help="--methods cp: depthwise kh x 1 then 1 x kw (4way) or one kh x kw depthwise (3way)")
    parser.add_argument("--models", nargs="+", default=["cls", "rec", "det"], choices=["cls", "rec", "det"])
    parser.add_argument("--norms", nargs="+", default=["data", "frobenius"])
    parser.add_argument("--allocations", nargs="+", default=["keep", "target_macs"],
                        choices=["keep", "target_macs", "target_latency"])
    parser.add_argument("--sensitivities", nargs="+", default=["auto"], choices=["auto", "on", "off", "measured"],
                        help="budgets' --sensitivity modes to compare (data norm only; default auto)")
    parser.add_argument("--quick", action="store_true", help="smoke test: cls only, one budget, small sets")
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads for every session (default 1)")
    parser.add_argument("--repeats", type=int, default=30, help="timed A/B pairs per latency measurement")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--plot", help="write task metric vs MACs kept to this .png (needs matplotlib)")
    args = parser.parse_args()
    n_calib, n_held, pages_calib, pages_held = 64, 100, 16, 24
    if args.quick:
        args.models, args.budgets, args.allocations = ["cls"], args.budgets[-1:], ["target_macs"]
        n_calib, n_held, args.repeats, args.warmup = 32, 50, 10, 2

    started = time.perf_counter()
    models = fetch_models()
    tasks = make_tasks(models, args.models, n_calib, n_held, pages_calib, pages_held, args.seed)
    lines = header(args)
    lines.append(f"- data: rec/cls {n_calib} calibration + {n_held} held-out rendered lines; det {pages_calib} + "
                 f"{pages_held} rendered {PAGE_W}x{PAGE_H} pages; fonts: "
                 f"{len(find_fonts()) or 'Pillow default'} TrueType files")
    print("\n".join(lines), flush=True)

    rows, originals, points, problems, workarounds = [], [], [], [], []
    for task in tasks:
        model = onnx.load(str(task.path))
        reference = run(model, task.held, args.threads)
        base = task.score(reference)
        extra = ""
        if task.name == "rec":
            extra = f", exact line with spaces {base['line_with_spaces']:.2f}; e.g. " + "; ".join(
                f"{p!r} for {t!r}" for p, t in base["examples"][:3])
        if task.name == "det":
            extra = f" over {base['boxes']} boxes, component precision {base['precision']:.3f}"
        originals.append(f"- {task.name} ({task.path.name}): {task.metric_name} {fmt_metric(task, base)}{extra}")
        print(originals[-1], flush=True)

        if count_macs(model, {"x": task.shape}) is None:
            folded, count = fold_dynamic_reshapes(model, task.shape)
            same = np.abs(run(folded, task.held, args.threads) - reference).max()  # float rounding only
            if count_macs(folded, {"x": task.shape}) is not None and same < 1e-4:
                workarounds.append(f"{task.name}: {count} run-time Reshape targets folded to constants before "
                                   f"compression (max output change {same:.1e}); the folded model is the baseline")
                model = folded
            else:
                workarounds.append(f"{task.name}: MACs unknown to onnxcomp; folding {count} Reshape targets did not "
                                   f"help (max output change {same:.1e})")
            print(f"  {workarounds[-1]}", flush=True)

        t0 = time.perf_counter()
        # The validation samples that judge candidate models stay out of the statistics, as
        # `compress` splits the data when it collects statistics itself.
        validation = held_out_mask(len(task.calib))
        stats = onnxcomp.calibrate(model, {"x": task.calib[~validation]}, batch_size=task.calib_batch,
                                   progress=False, skip=task.skip)
        print(f"  calibration: {time.perf_counter() - t0:.1f}s, {len(stats)} layer inputs", flush=True)
        for method in args.methods:
            for budget in args.budgets:
                for allocation in args.allocations:
                    for norm, sensitivity in runs(args):
                        shown = f"cp {args.cp_form}" if method == "cp" else method
                        label = f"{task.name} {shown} {norm} {allocation}={budget} sensitivity={sensitivity}"
                        t0 = time.perf_counter()
                        try:
                            # The data norm also gets the validation samples: they judge a budget's
                            # candidates; the Frobenius baseline stays data-free.
                            judge = {"x": task.calib[validation]} if norm == "data" else None
                            compressed, report = onnxcomp.compress(
                                model, stats=stats, validation_data=judge, input_shapes={"x": task.shape},
                                method=method, norm=norm, skip=task.skip, progress=False, cp_form=args.cp_form,
                                **{allocation: budget},
                                **({} if allocation == "keep" else {"sensitivity": sensitivity}),
                                threads=args.threads, latency_cache=CACHE / "latency" / "latency.json",
                            )
                            t1 = time.perf_counter()
                            t = report.totals
                            kept = t["macs_after"] / t["macs_before"] if t["macs_before"] else float("nan")
                            score = task.score(run(compressed, task.held, args.threads))
                            t2 = time.perf_counter()
                            result = bench(model, compressed, {"x": task.held}, batch_sizes=(1,), threads=args.threads,
                                           repeats=args.repeats, warmup=args.warmup, eval_batch_size=8)
                            error = next(iter(result.outputs.values()))["relative_l2"]
                            latency = result.latency[0].ratio
                            rows.append((task.name, shown, norm, f"{allocation}={budget}",
                                         chosen_sensitivity(report, sensitivity, allocation), f"{kept:.1%}",
                                         f"{fmt_metric(task, base)} -> {fmt_metric(task, score)}",
                                         f"{error:.4f}", f"{latency:.2f}", f"{report.seconds['solve']:.0f}"))
                            points.append((task.name, f"{shown}/{norm}/{allocation}/{sensitivity}", kept,
                                           score["value"]))
                        except Exception as exc:  # report and go on: the table shows what failed
                            text = f"{type(exc).__name__}: {first_line(exc)}"
                            problems.append(f"{label}: {text}")
                            rows.append((task.name, shown, norm, f"{allocation}={budget}", sensitivity, "-",
                                         f"FAILED ({text[:80]})", "-", "-", "-"))
                        spent = f"{time.perf_counter() - t0:.1f}s"
                        if rows[-1][5] != "-":
                            spent += (f": compress {t1 - t0:.1f}s, task metric {t2 - t1:.1f}s, "
                                      f"bench {time.perf_counter() - t2:.1f}s")
                        print(f"  {label}: {' | '.join(rows[-1][5:])}  ({spent})", flush=True)

    out = ["", "Original models on the held-out rendered inputs:", "", *originals, "",
           "| model | method | norm | allocation | sensitivity | MACs kept | task metric (original -> compressed) "
           "| output rel. L2 | latency ratio | solve s |",
           "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    out += ["| " + " | ".join(row) + " |" for row in rows]
    out += ["", "allocation: keep=F keeps F of every compressed layer's MACs; target_macs=F is a whole-model budget "
            "(F of the model's MACs, allocated across layers); target_latency=F: F of the model's measured "
            "onnxruntime latency (batch 1, --threads). MACs kept: whole model, depthwise/grouped convs "
            "(never compressed) included. rec metric: character accuracy / exact-line accuracy (spaces ignored). "
            "solve s: the compression's solve stage (candidates, allocation, decompositions), statistics excluded."]
    if workarounds:
        out += ["", "Workarounds in this script:", *[f"- {w}" for w in workarounds]]
    if problems:
        out += ["", "Failures:", *[f"- {p}" for p in problems]]
    out.append(f"\ntotal time: {time.perf_counter() - started:.0f}s")
    print("\n".join(out))
    if args.plot:
        plot(points, args.plot)


def runs(args) -> list[tuple[str, str]]:
    """(norm, sensitivity) pairs: the sensitivity modes apply to the data norm; Frobenius runs once (auto)."""
    return [(norm, mode) for norm in args.norms for mode in (args.sensitivities if norm == "data" else ["auto"])]


def chosen_sensitivity(report, mode: str, allocation: str) -> str:
    """The mode, and for auto what it chose on the validation samples."""
    if allocation == "keep":
        return "-"
    note = (report.settings.get("target") or {}).get("sensitivity") or {}
    if mode == "auto" and "weighted" in note:
        return "auto: " + ("weighted" if note["weighted"] else "unweighted")
    return mode


def plot(points, path: str) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("--plot needs matplotlib (pip install matplotlib); no plot written", file=sys.stderr)
        return
    names = sorted({p[0] for p in points})
    fig, axes = plt.subplots(1, len(names), figsize=(5 * len(names), 4), squeeze=False)
    for ax, name in zip(axes[0], names):
        for series in sorted({p[1] for p in points if p[0] == name}):
            xy = sorted((p[2], p[3]) for p in points if p[0] == name and p[1] == series)
            ax.plot(*zip(*xy), marker="o", label=series)
        ax.set_title(name)
        ax.set_xlabel("MACs kept")
        ax.set_ylabel("task metric")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"plot written to {path}", file=sys.stderr)


if __name__ == "__main__":
    main()
