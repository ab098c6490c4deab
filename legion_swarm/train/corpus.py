"""The built-in corpus: English text derived from the Python standard library's own documentation.

Training must work with no network and no download, so the default data source is text every Python
installation already carries: the docstrings of a fixed, sorted list of standard-library modules (the module
docstring, then each class, function and method defined there, via :func:`inspect.getdoc`), followed by the
topics of the language reference that ``help()`` shows (:mod:`pydoc_data.topics`). Each docstring is one
document, titled with its dotted name; documents are separated by the end-of-document id. That is about 2 MB
of prose, API descriptions and doctest examples, enough for the small presets to learn real structure from.

**Determinism.** The text depends only on the Python version, the platform and the build options (a Python
without ``_decimal`` documents :mod:`decimal` differently); the walk itself is deterministic (sorted names,
duplicates dropped in order, memory addresses scrubbed). :func:`corpus_fingerprint` is the sha256 of the
token bytes: a swarm pins it in its config (``DataConfig.fingerprint``) so a peer whose corpus differs
refuses to train instead of silently learning from other data.

The walk runs in a fresh interpreter (``python -I``), not in the calling process: what a process sees depends
on what it imported before (torch replaces :func:`inspect.getfile`, ``typing_extensions`` patches
:mod:`typing`), and the 350 imported modules (some 35 MB) would otherwise stay loaded in every peer. Modules are
imported, never run as scripts; those with side effects on import (``this``, ``antigravity``), GUI toolkits,
``readline``, modules that warn on import and Windows-only modules are excluded by name.

**Cache.** Building takes about a second, so the tokens are cached under ``$XDG_CACHE_HOME/legion-swarm``
(default ``~/.cache/legion-swarm``), keyed by the Python version, platform and :data:`CORPUS_VERSION`. The file
is written atomically (temporary file, then :func:`os.replace`), so a concurrent reader never sees a torn file,
and its fingerprint is checked on every load: a corrupted cache is rebuilt.
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import json
import logging
import os
import pkgutil
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from types import ModuleType

import numpy as np

from legion_swarm.errors import DataError
from legion_swarm.train.tokenizer import EOS_ID, ByteTokenizer, token_fingerprint

logger = logging.getLogger(__name__)

CORPUS_VERSION = 1
"""Version of the recipe below; bump it whenever the module list or the document format changes."""

MODULES: tuple[str, ...] = (
    "__future__", "_pydecimal", "_pyio", "_threading_local", "abc", "argparse", "array", "ast", "asyncio",
    "atexit", "base64", "bdb", "binascii", "bisect", "builtins", "bz2", "cProfile", "calendar", "cmath", "cmd",
    "code", "codecs", "codeop", "collections", "colorsys", "compileall", "concurrent", "configparser",
    "contextlib", "contextvars", "copy", "copyreg", "csv", "ctypes", "dataclasses", "datetime", "decimal",
    "difflib", "dis", "doctest", "email", "enum", "errno", "faulthandler", "fcntl", "filecmp", "fileinput",
    "fnmatch", "fractions", "ftplib", "functools", "gc", "genericpath", "getopt", "getpass", "gettext", "glob",
    "graphlib", "grp", "gzip", "hashlib", "heapq", "hmac", "html", "http", "imaplib", "importlib", "inspect", "io",
    "ipaddress", "itertools", "json", "keyword", "linecache", "locale", "logging", "lzma", "mailbox", "marshal",
    "math", "mimetypes", "mmap", "modulefinder", "multiprocessing", "netrc", "ntpath", "nturl2path", "numbers",
    "opcode", "operator", "optparse", "os", "pathlib", "pdb", "pickle", "pickletools", "pkgutil", "platform",
    "plistlib", "poplib", "posix", "posixpath", "pprint", "profile", "pstats", "pty", "pwd", "py_compile",
    "pyclbr", "pydoc", "pyexpat", "queue", "quopri", "random", "re", "reprlib", "resource", "runpy", "sched",
    "secrets", "select", "selectors", "shelve", "shlex", "shutil", "signal", "site", "smtplib", "socket",
    "socketserver", "sqlite3", "ssl", "stat", "statistics", "string", "stringprep", "struct", "subprocess",
    "symtable", "sys", "sysconfig", "syslog", "tabnanny", "tarfile", "tempfile", "termios", "textwrap",
    "threading", "time", "timeit", "token", "tokenize", "tomllib", "trace", "traceback", "tracemalloc", "tty",
    "types", "typing", "unicodedata", "unittest", "urllib", "uuid", "venv", "warnings", "wave", "weakref",
    "wsgiref", "xml", "xmlrpc", "zipapp", "zipfile", "zipimport", "zlib", "zoneinfo",
)  # fmt: skip
"""Standard-library modules and packages whose docstrings make the corpus (packages with their submodules)."""

EXCLUDED = frozenset(
    {
        # Side effects on import: prints the Zen of Python / opens a web browser / starts demos.
        "this", "antigravity", "turtle", "turtledemo", "__main__",
        # GUI toolkits and terminal state.
        "idlelib", "tkinter", "readline", "rlcompleter", "curses", "webbrowser",
        # Deprecated (PEP 594 and older): importing them emits warnings.
        "aifc", "asynchat", "asyncore", "audioop", "cgi", "cgitb", "chunk", "crypt", "distutils", "imghdr", "imp",
        "lib2to3", "mailcap", "msilib", "nis", "nntplib", "ossaudiodev", "pipes", "smtpd", "sndhdr", "spwd",
        "sunau", "telnetlib", "uu", "xdrlib", "sre_compile", "sre_constants", "sre_parse",
        # Windows-only, optional database bindings, codec tables, and the standard library's own tests.
        "msvcrt", "winreg", "winsound", "nt", "dbm", "encodings", "ensurepip", "test", "tests",
    }
)  # fmt: skip
"""Module names (at any level of a dotted name) that are never imported."""

CHILD_TIMEOUT_S = 300.0
"""Upper bound on building the corpus in a fresh interpreter (about a second on a laptop)."""
MIN_CORPUS_CHARS = 500_000
"""Fewer characters than this means the interpreter lacks docstrings (``-OO``): refuse rather than train on it."""

_ADDRESS_RE = re.compile(r" at 0x[0-9A-Fa-f]+")
_MAGIC = b"legion-swarm corpus tokens v1\n"
_lock = threading.Lock()
_memo: tuple[np.ndarray, str] | None = None


def corpus_documents() -> list[str]:
    """The corpus as documents (``"<dotted name>\\n\\n<docstring>"``), in their fixed order. Slow (about a
    second): collected in a fresh interpreter; use :func:`corpus_tokens` for the cached tokens."""
    # A fresh interpreter, because the docstrings a process sees depend on what it imported before: torch
    # replaces inspect.getfile and typing_extensions patches typing, so the same walk in a peer process would
    # give another corpus than in the CLI. -I ignores PYTHON* variables and the user's site-packages; the parent's
    # sys.path still finds this package.
    code = f"import sys; sys.path[:] = {sys.path!r}; from {__name__} import _child_main; _child_main()"
    try:
        proc = subprocess.run(
            [sys.executable, "-I", "-c", code], capture_output=True, timeout=CHILD_TIMEOUT_S, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as e:
        raise DataError(f"cannot build the built-in corpus: {e}") from None
    if proc.returncode != 0:
        tail = proc.stderr.decode("utf-8", errors="replace").strip()[-2000:]
        raise DataError(f"building the built-in corpus failed (exit code {proc.returncode}): {tail}")
    docs = json.loads(proc.stdout)
    assert isinstance(docs, list) and all(isinstance(d, str) for d in docs)
    if sum(map(len, docs)) < MIN_CORPUS_CHARS:
        # A Python whose standard library was installed without docstrings (compiled with -OO only) has next to
        # nothing to offer; the child itself never runs optimised (-I ignores PYTHONOPTIMIZE).
        raise DataError(
            f"the built-in corpus has only {sum(map(len, docs))} characters: this Python's standard library has "
            "no docstrings; use source = 'dummy' or a local file"
        )
    return docs


def _child_main() -> None:
    """Entry point of the fresh interpreter: print the documents as a JSON list."""
    with contextlib.redirect_stdout(sys.stderr):  # whatever an imported module prints must not corrupt the JSON
        docs = _walk_documents()
    json.dump(docs, sys.stdout)


def _walk_documents() -> list[str]:
    """Import :data:`MODULES` and collect their docstrings, in this process."""
    docs: list[str] = []
    seen: set[str] = set()

    def add(title: str, obj: object) -> None:
        doc = inspect.getdoc(obj)
        # getdoc falls back to a base class's docstring: keep each text once, where it first appears.
        if not doc or doc in seen:
            return
        seen.add(doc)
        # A docstring generated from a signature (dataclasses without one) may embed object addresses.
        docs.append(f"{title}\n\n{_ADDRESS_RE.sub('', doc)}")

    for name in _module_names():
        module = sys.modules[name]
        add(name, module)
        for attr, value in sorted(vars(module).items()):
            if attr.startswith("__") or getattr(value, "__module__", None) != name:
                continue  # re-exports are documented where they are defined
            if inspect.isclass(value):
                add(f"{name}.{attr}", value)
                for member, member_value in sorted(vars(value).items()):
                    if not member.startswith("__"):
                        add(f"{name}.{attr}.{member}", member_value)
            elif callable(value):
                add(f"{name}.{attr}", value)
    # The language reference's topics, as help("with") shows them: prose, no docstring duplicates.
    topics = importlib.import_module("pydoc_data.topics").topics
    for key in sorted(topics):
        text = topics[key].strip()
        if text and text not in seen:
            seen.add(text)
            docs.append(f"{key}\n\n{text}")
    return docs


def _module_names() -> list[str]:
    """Import :data:`MODULES` and their submodules; return the names that imported, sorted."""
    names: list[str] = []
    for name in MODULES:
        module = _try_import(name)
        if module is None:
            continue
        names.append(name)
        if hasattr(module, "__path__"):
            names.extend(_submodules(module))
    return sorted(names)


def _submodules(package: ModuleType) -> list[str]:
    found: list[str] = []
    for info in sorted(pkgutil.iter_modules(package.__path__, package.__name__ + "."), key=lambda i: i.name):
        if info.name.rsplit(".", 1)[1] in EXCLUDED:
            continue
        module = _try_import(info.name)
        if module is not None:
            found.append(info.name)
            if info.ispkg:
                found.extend(_submodules(module))
    return found


def _try_import(name: str) -> ModuleType | None:
    if any(part in EXCLUDED for part in name.split(".")):
        return None
    try:
        return importlib.import_module(name)
    except Exception as e:  # platform-specific modules (asyncio.windows_events) and missing C extensions
        logger.debug("corpus: skipping %s (%s: %s)", name, type(e).__name__, e)
        return None


def build_corpus_tokens() -> np.ndarray:
    """Tokenize the corpus with the byte tokenizer, one end-of-document id after each document. Uncached."""
    tok = ByteTokenizer()
    parts: list[np.ndarray] = []
    eos = np.array([EOS_ID], dtype=np.uint16)
    for doc in corpus_documents():
        parts.extend((tok.encode(doc), eos))
    return np.concatenate(parts)


def cache_dir() -> Path:
    """``$XDG_CACHE_HOME/legion-swarm`` (``~/.cache/legion-swarm`` when the variable is unset or empty)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "legion-swarm"


def cache_path() -> Path:
    """Where this interpreter's corpus tokens are cached."""
    version = "{}{}.{}.{}".format(sys.implementation.name, *sys.version_info[:3])
    return cache_dir() / f"corpus-v{CORPUS_VERSION}-{version}-{sys.platform}.tokens"


def corpus_tokens() -> np.ndarray:
    """The corpus as ``uint16`` byte-tokenizer ids: from the cache when it is intact, else built and cached."""
    return _cached()[0]


def corpus_fingerprint() -> str:
    """sha256 (hex) of the corpus tokens; pin it in ``DataConfig.fingerprint``."""
    return _cached()[1]


def _cached() -> tuple[np.ndarray, str]:
    global _memo
    # One build per process even when several threads ask at once (load_tokens runs in worker threads).
    with _lock:
        if _memo is None:
            _memo = _load_or_build(cache_path())
        return _memo


def _load_or_build(path: Path) -> tuple[np.ndarray, str]:
    loaded = _load(path)
    if loaded is not None:
        return loaded
    started = time.perf_counter()
    tokens = build_corpus_tokens()
    tokens.setflags(write=False)
    fingerprint = token_fingerprint(tokens)
    logger.info(
        "built the corpus: %d tokens in %.2f s, fingerprint %s", len(tokens), time.perf_counter() - started,
        fingerprint[:16],
    )  # fmt: skip
    _store(path, tokens, fingerprint)
    return tokens, fingerprint


def clear_memory_cache() -> None:
    """Forget the in-process copy, so the next call reads (or rebuilds) the file cache."""
    global _memo
    with _lock:
        _memo = None


def _load(path: Path) -> tuple[np.ndarray, str] | None:
    """The cached tokens and fingerprint, or None if the file is missing, truncated or corrupted."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as e:
        logger.warning("cannot read the corpus cache %s (%s): rebuilding", path, e)
        return None
    header = len(_MAGIC) + 65  # magic, 64 hex digits, newline
    if not data.startswith(_MAGIC) or len(data) < header or (len(data) - header) % 2:
        logger.warning("corpus cache %s is malformed: rebuilding", path)
        return None
    fingerprint = data[len(_MAGIC) : header - 1].decode("ascii", errors="replace")
    tokens = np.frombuffer(data, dtype="<u2", offset=header).astype(np.uint16)
    if token_fingerprint(tokens) != fingerprint:
        logger.warning("corpus cache %s does not match its fingerprint: rebuilding", path)
        return None
    tokens.setflags(write=False)
    return tokens, fingerprint


def _store(path: Path, tokens: np.ndarray, fingerprint: str) -> None:
    """Write the cache atomically; a cache that cannot be written only costs the next process a rebuild."""
    tmp: str | None = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
        with os.fdopen(fd, "wb") as f:
            f.write(_MAGIC + fingerprint.encode("ascii") + b"\n")
            f.write(np.ascontiguousarray(tokens, dtype="<u2").tobytes())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        tmp = None
    except OSError as e:
        logger.warning("cannot write the corpus cache %s: %s", path, e)
    finally:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)


DUMMY_ALPHABET = b" etaoinshrdlucmf"
"""Symbols of the synthetic language, as bytes (readable when decoded; ids < 256 fit the byte tokenizer)."""
DUMMY_BRANCHING = 4
"""Successors each symbol allows."""
DUMMY_CONCENTRATION = 0.5
"""Dirichlet concentration of the successor probabilities: below 1, each context favours one or two of them."""
DUMMY_DOC_LENGTHS = (64, 512)
"""Range of document lengths, in symbols."""


def dummy_tokens(n_tokens: int, seed: int) -> np.ndarray:
    """``n_tokens`` byte-tokenizer ids of a seeded synthetic language: quick to learn, with more to learn later.

    Documents of 64..511 symbols from an order-2 Markov chain over 16 symbols, each followed by the
    end-of-document id. The previous symbol decides which 4 symbols may follow (a bigram structure a model picks
    up in a few dozen steps); the two previous symbols together decide their probabilities (which takes
    attention to learn). Entropy per symbol (seed 0): 2.65 nats from frequencies alone, 1.29 given the previous
    symbol and 0.97 given two, against ln 257 = 5.55 for a uniform guess. The language and the text both follow
    from ``seed``.
    """
    rng = np.random.default_rng(seed)
    k = len(DUMMY_ALPHABET)
    allowed = np.argsort(rng.random((k, k)), axis=1)[:, :DUMMY_BRANCHING]  # [previous symbol, 4]
    successors = np.repeat(allowed[None], k, axis=0).reshape(k * k, DUMMY_BRANCHING)  # [context a*k+b, 4]
    weights = rng.dirichlet(np.full(DUMMY_BRANCHING, DUMMY_CONCENTRATION), size=k * k)
    cumulative = weights.cumsum(axis=1)  # [context, 4]
    alphabet = np.frombuffer(DUMMY_ALPHABET, dtype=np.uint8).astype(np.uint16)
    low, high = DUMMY_DOC_LENGTHS
    parts: list[np.ndarray] = []
    have = 0
    while have < n_tokens:
        # All documents of a batch advance together, one symbol per step: numpy work, not a Python loop per token.
        n_docs = (n_tokens - have) // ((low + high) // 2) + 16
        lengths = rng.integers(low, high, size=n_docs)
        symbols = np.empty((n_docs, high), dtype=np.int64)
        symbols[:, :2] = rng.integers(0, k, size=(n_docs, 2))
        for t in range(2, high):
            context = symbols[:, t - 2] * k + symbols[:, t - 1]
            choice = (rng.random(n_docs)[:, None] > cumulative[context]).sum(axis=1)
            symbols[:, t] = successors[context, np.minimum(choice, DUMMY_BRANCHING - 1)]
        docs = np.full((n_docs, high + 1), EOS_ID, dtype=np.uint16)
        docs[:, :high] = alphabet[symbols]
        docs[np.arange(n_docs), lengths] = EOS_ID
        parts.append(docs[np.arange(high + 1)[None, :] <= lengths[:, None]])  # row-major: documents in order
        have += len(parts[-1])
    return np.concatenate(parts)[:n_tokens]
