"""lm-eval on a model held in memory, with the paper's multilingual tasks named per language.

A *task family* (``belebele``, ``arc``, ...) and a language code (``de``) name one lm-eval task
(``belebele_deu_Latn``, ``arc_de``): :func:`task_name` holds that map. Our own tasks
(``nextsent``, offline; ``mkqa``) live in ``polyprune/eval/tasks/`` and are found through
lm-eval's ``include_path``. The model is wrapped as ``HFLM(pretrained=model, tokenizer=tok)``:
no second copy is loaded, so a pruned model is evaluated straight after compression.

A task whose data cannot be had (offline, gated, no such language) is *unavailable*: one log
line says which and why, and the run goes on with the rest.
"""

from __future__ import annotations

import contextlib
import logging
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from polyprune.errors import InputError

__all__ = [
    "FAMILIES",
    "FLORES",
    "TASKS_DIR",
    "HarnessConfig",
    "HarnessResult",
    "TaskScore",
    "Unavailable",
    "per_sample_scores",
    "run_tasks",
    "task_name",
]

logger = logging.getLogger(__name__)

TASKS_DIR = Path(__file__).parent / "tasks"

# ISO 639-1 -> FLORES-200 code (language_Script) for Belebele.
FLORES = {
    "af": "afr_Latn", "am": "amh_Ethi", "ar": "arb_Arab", "bg": "bul_Cyrl", "bn": "ben_Beng",
    "ca": "cat_Latn", "cs": "ces_Latn", "da": "dan_Latn", "de": "deu_Latn", "el": "ell_Grek",
    "en": "eng_Latn", "es": "spa_Latn", "et": "est_Latn", "eu": "eus_Latn", "fa": "pes_Arab",
    "fi": "fin_Latn", "fr": "fra_Latn", "he": "heb_Hebr", "hi": "hin_Deva", "hr": "hrv_Latn",
    "hu": "hun_Latn", "hy": "hye_Armn", "id": "ind_Latn", "is": "isl_Latn", "it": "ita_Latn",
    "ja": "jpn_Jpan", "ka": "kat_Geor", "ko": "kor_Hang", "lt": "lit_Latn", "lv": "lvs_Latn",
    "nl": "nld_Latn", "no": "nob_Latn", "pl": "pol_Latn", "pt": "por_Latn", "ro": "ron_Latn",
    "ru": "rus_Cyrl", "sk": "slk_Latn", "sl": "slv_Latn", "sr": "srp_Cyrl", "sv": "swe_Latn",
    "sw": "swh_Latn", "ta": "tam_Taml", "te": "tel_Telu", "th": "tha_Thai", "tr": "tur_Latn",
    "uk": "ukr_Cyrl", "ur": "urd_Arab", "vi": "vie_Latn", "zh": "zho_Hans",
}  # fmt: skip

# Family -> lm-eval task name for a language. English ARC and HellaSwag are the originals;
# the translated ones are Okapi's (Lai et al., 2023).
_NAMES = {
    "nextsent": lambda lang: f"polyprune_nextsent_{lang}",
    "belebele": lambda lang: f"belebele_{FLORES[lang]}" if lang in FLORES else None,
    "arc": lambda lang: "arc_challenge" if lang == "en" else f"arc_{lang}",
    "hellaswag": lambda lang: "hellaswag" if lang == "en" else f"hellaswag_{lang}",
    "mmlu": lambda lang: f"m_mmlu_{lang}",
    "xnli": lambda lang: f"xnli_{lang}",
    "xcopa": lambda lang: f"xcopa_{lang}",
    "xstorycloze": lambda lang: f"xstorycloze_{lang}",
    "mkqa": lambda lang: f"polyprune_mkqa_{lang}",
}
FAMILIES = tuple(_NAMES)
# The metric a table shows for a family (all of the task's metrics are stored).
PRIMARY_METRIC = {family: "acc" for family in FAMILIES} | {"mkqa": "f1"}


def task_name(family: str, lang: str) -> str | None:
    """lm-eval task name of ``family`` in ``lang``; None where the map has none."""
    if family not in _NAMES:
        raise InputError(f"unknown task {family!r}; allowed: ppl, {', '.join(FAMILIES)}")
    return _NAMES[family](lang)


@dataclass(frozen=True)
class HarnessConfig:
    limit: int | None = None  # examples per task (None: all)
    num_fewshot: int | None = None  # None: each task's default
    batch_size: int = 8
    device: str = "cpu"
    seed: int = 1234
    progress: bool = True  # lm-eval's progress bars
    # Keyword arguments for every task's data hook, e.g. {"source": "DIR"} for nextsent.
    metadata: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.limit is not None and self.limit < 1:
            raise InputError(f"limit must be >= 1, got {self.limit}")
        if self.batch_size < 1:
            raise InputError(f"batch_size must be >= 1, got {self.batch_size}")


@dataclass(frozen=True)
class TaskScore:
    task: str  # family, e.g. "belebele"
    lang: str
    metric: str  # "acc", "acc_norm", "f1", ...
    value: float
    n: int  # examples scored
    lm_eval_task: str


@dataclass(frozen=True)
class Unavailable:
    task: str
    lang: str
    reason: str


@dataclass
class HarnessResult:
    scores: list[TaskScore] = field(default_factory=list)
    unavailable: list[Unavailable] = field(default_factory=list)
    # (family, lang, metric) -> {doc_id: value}: lm-eval's per-example scores, for paired tests
    per_sample: dict[tuple[str, str, str], dict[int, float]] = field(default_factory=dict)


def _reason(e: BaseException) -> str:
    text = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return f"{type(e).__name__}: {text[:200]}" if text else type(e).__name__


# Our own tasks need no scan of lm-eval's thousands of task files (6 s on 2 CPU cores).
OWN_FAMILIES = frozenset({"nextsent", "mkqa"})


def _task_manager(families: list[str], metadata: dict):
    from lm_eval.tasks import TaskManager

    return TaskManager(
        include_path=str(TASKS_DIR),
        include_defaults=not OWN_FAMILIES.issuperset(families),
        metadata=metadata or None,
    )


def _git_hash_quietly() -> str | None:
    """lm-eval's ``get_git_commit_hash`` (``git describe`` in the current directory, else the
    files of a ``.git`` there) without git's "fatal: not a git repository" on our stderr."""
    from lm_eval.loggers.utils import get_commit_from_path

    try:
        out = subprocess.check_output(["git", "describe", "--always"], stderr=subprocess.DEVNULL)
        return out.strip().decode()
    except (subprocess.CalledProcessError, FileNotFoundError):
        return get_commit_from_path(os.getcwd())


def _is_tqdm(obj, tqdm) -> bool:
    return isinstance(obj, type) and issubclass(obj, tqdm)


@contextlib.contextmanager
def _lm_eval_quiet(progress: bool) -> Iterator[None]:
    """lm-eval run without git's stderr and, unless ``progress``, without progress bars.

    lm-eval passes ``disable=False`` to tqdm explicitly, which overrides TQDM_DISABLE; so its
    modules' ``tqdm`` is swapped for a subclass that is always disabled, and put back after.
    """
    from tqdm import tqdm

    class _SilentTqdm(tqdm):
        def __init__(self, *args, **kwargs):
            kwargs["disable"] = True
            super().__init__(*args, **kwargs)

    patches = [(sys.modules["lm_eval.evaluator"], "get_git_commit_hash", _git_hash_quietly)]
    if not progress:
        patches += [
            (mod, "tqdm", _SilentTqdm)
            for name, mod in list(sys.modules.items())
            if name.startswith("lm_eval") and _is_tqdm(getattr(mod, "tqdm", None), tqdm)
        ]
    saved = [(mod, attr, getattr(mod, attr)) for mod, attr, _ in patches]
    try:
        for mod, attr, value in patches:
            setattr(mod, attr, value)
        yield
    finally:
        for mod, attr, value in saved:
            setattr(mod, attr, value)


def run_tasks(
    model, tokenizer, families: list[str], langs: list[str], cfg: HarnessConfig | None = None
) -> HarnessResult:
    """Evaluate ``model`` on every (family, language); unavailable ones are logged and listed."""
    cfg = cfg or HarnessConfig()
    for family in families:
        task_name(family, "en")  # unknown family -> InputError before any work
    try:
        from lm_eval import simple_evaluate
        from lm_eval.models.huggingface import HFLM
    except ImportError as e:
        raise InputError("lm-eval tasks need lm-eval: pip install 'polyprune[eval]'") from e

    # lm-eval logs a warning per custom-data task and per in-memory model; ours say enough.
    if not logger.isEnabledFor(logging.DEBUG):
        logging.getLogger("lm_eval").setLevel(logging.ERROR)
    tm = _task_manager(families, cfg.metadata)
    known = set(tm.all_tasks)
    result = HarnessResult()
    loaded = {}  # lm-eval task name -> (family, lang, Task)
    for family in families:
        for lang in langs:
            name = task_name(family, lang)
            if name is None or name not in known:
                why = f"lm-eval has no {family} task for language {lang!r}"
                logger.warning("task %s/%s unavailable: %s", family, lang, why)
                result.unavailable.append(Unavailable(family, lang, why))
                continue
            try:  # building a Task fetches its data
                task = tm.load([name])["tasks"]
            except Exception as e:  # network, gated dataset, missing file: all mean "no data"
                why = f"{name}: {_reason(e)}"
                logger.warning("task %s/%s unavailable: %s", family, lang, why)
                result.unavailable.append(Unavailable(family, lang, why))
                continue
            for obj in task.values():
                loaded[name] = (family, lang, obj)
    if not loaded:
        return result

    was_training = model.training
    model.eval()
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=cfg.batch_size, device=cfg.device)
    with _lm_eval_quiet(cfg.progress):
        out = simple_evaluate(
            model=lm,
            tasks=[obj for _, _, obj in loaded.values()],
            num_fewshot=cfg.num_fewshot,
            limit=cfg.limit,
            task_manager=tm,
            log_samples=True,  # per-example scores: paired tests between calibration mixes
            bootstrap_iters=0,
            random_seed=cfg.seed,
            numpy_random_seed=cfg.seed,
            torch_random_seed=cfg.seed,
            fewshot_random_seed=cfg.seed,
        )
    model.train(was_training)
    for name, (family, lang, _) in loaded.items():
        metrics = out["results"][name]
        n = int(out.get("n-samples", {}).get(name, {}).get("effective", 0))
        for key, value in metrics.items():
            metric, _, filt = key.partition(",")
            if metric == "alias" or metric.endswith("_stderr") or not filt:
                continue
            if not isinstance(value, (int, float)):
                continue
            result.scores.append(TaskScore(family, lang, metric, float(value), n, name))
            logger.info("%s %s: %s %.4f (n=%d)", family, lang, metric, value, n)
        for metric, per_doc in per_sample_scores(out.get("samples", {}).get(name, [])).items():
            result.per_sample[(family, lang, metric)] = per_doc
    return result


def per_sample_scores(samples: list[dict]) -> dict[str, dict[int, float]]:
    """metric -> {doc_id: value} from lm-eval's logged samples (numeric metrics only; of
    several filters, the first logged one per document)."""
    out: dict[str, dict[int, float]] = {}
    for s in samples:
        for metric in s.get("metrics", []):
            value = s.get(metric)
            if isinstance(value, bool | int | float):
                out.setdefault(metric, {}).setdefault(int(s["doc_id"]), float(value))
    return out
