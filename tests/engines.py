"""Fake engines for tests, chosen by configuration (`ocr.engine: "tests.engines:Hang"`).

Each one behaves like a model for ordinary pages and misbehaves only on a page whose width is its
trigger, so one daemon can show a bad page costing one file and the next file succeeding.
Echo's text is "echo <width>x<height>", which lets tests check which page went where.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import threading
import time
from typing import Any

from PIL import Image

HANG_WIDTH = 17
SEGFAULT_WIDTH = 13
ERROR_WIDTH = 19


class Echo:
    def __init__(self, *, model: Any = None, prompt: Any = None, device: Any = None, **options: Any):
        self.model = model or "echo"
        self.delay_s = float(options.get("delay_s", 0))

    def ocr(self, image: Image.Image) -> str:
        if self.delay_s:
            time.sleep(self.delay_s)  # a model that takes this long per page
        return f"echo {image.width}x{image.height}"


class Hang(Echo):
    """Hangs inside native code with every signal blocked, after starting a grandchild: only a
    SIGKILL of the whole process group ends it (what SIGALRM-based timeouts never managed)."""

    def ocr(self, image: Image.Image) -> str:
        if image.width != HANG_WIDTH:
            return super().ocr(image)
        subprocess.Popen([sys.executable, "-c", "import time; time.sleep(3600)"])
        signal.pthread_sigmask(signal.SIG_BLOCK, set(signal.Signals) - {signal.SIGKILL, signal.SIGSTOP})
        libc = ctypes.CDLL(None)
        while True:
            libc.pause()


class Segfault(Echo):
    def ocr(self, image: Image.Image) -> str:
        if image.width == SEGFAULT_WIDTH:
            ctypes.string_at(0)  # SIGSEGV in native code
        return super().ocr(image)


class Slow(Echo):
    """Sleeps `seconds` on every page (default 3600): a file stays in the child until killed."""

    def __init__(self, **kwargs: Any):
        super().__init__(**kwargs)
        self.seconds = float(kwargs.get("seconds", 3600))

    def ocr(self, image: Image.Image) -> str:
        time.sleep(self.seconds)
        return super().ocr(image)


class Broken:
    """Cannot load: the model folder is missing."""

    def __init__(self, **kwargs: Any):
        raise FileNotFoundError("model folder /nonexistent not found")

    def ocr(self, image: Image.Image) -> str:  # pragma: no cover
        raise AssertionError


class ScriptedMemory(Echo):
    """Reports GPU memory read from a file the test writes (`options.memory_file`: free MB), the
    seam engines such as onnxruntime or vLLM use to report their own device memory."""

    def __init__(self, **kwargs: Any):
        super().__init__(**kwargs)
        self.memory_file = kwargs["memory_file"]

    def gpu_info(self) -> dict[str, Any]:
        with open(self.memory_file) as f:
            free = int(f.read().strip() or 0)
        total = 16000
        return {
            "available": True,
            "device": "cuda:0 (scripted)",
            "total_mb": total,
            "used_mb": total - free,
            "free_mb": free,
            "usage_percent": round(100 * (total - free) / total, 1),
            "torch_reserved_mb": 0,
            "torch_allocated_mb": 0,
        }

    def clear_cache(self) -> None:
        pass


class CountingClears(Echo):
    """Appends the number of pages read so far to `options.log` on every cache clear."""

    def __init__(self, **kwargs: Any):
        super().__init__(**kwargs)
        self.log = kwargs["log"]
        self.pages = 0

    def ocr(self, image: Image.Image) -> str:
        self.pages += 1
        return super().ocr(image)

    def clear_cache(self) -> None:
        with open(self.log, "a") as f:
            f.write(f"{self.pages}\n")


class DeviceEcho(Echo):
    """Says which GPU the child was given (CUDA_VISIBLE_DEVICES) and its pid."""

    def ocr(self, image: Image.Image) -> str:
        super().ocr(image)
        return f"device {os.environ.get('CUDA_VISIBLE_DEVICES')} pid {os.getpid()}"


class SlowLoad(Echo):
    """Takes `load_s` seconds to load, like a real model."""

    def __init__(self, **kwargs: Any):
        time.sleep(float(kwargs.get("load_s", 1)))
        super().__init__(**kwargs)


MEMORY_ERROR_WIDTH = 23
CHATTY_WIDTH = 29
CLOSE_PIPE_WIDTH = 31


class Misbehaving(Echo):
    """One engine, several faults, each on its own trigger width: MemoryError, megabytes on
    stdout, closing the protocol pipe; with `options.exit_once` (a marker path) the first child
    exits right after it has loaded."""

    def __init__(self, **kwargs: Any):
        super().__init__(**kwargs)
        marker = kwargs.get("exit_once")
        if marker and not os.path.exists(marker):
            open(marker, "w").close()
            threading.Timer(0.05, os._exit, [0]).start()

    def ocr(self, image: Image.Image) -> str:
        if image.width == MEMORY_ERROR_WIDTH:
            raise MemoryError("CUDA out of memory (simulated)")
        if image.width == CHATTY_WIDTH:
            for _ in range(4096):
                print("x" * 1023)  # 4 MB on stdout, as DeepSeek-OCR streams its text
            sys.stdout.flush()
        if image.width == CLOSE_PIPE_WIDTH:
            os.close(int(sys.argv[2]))  # the child's end of the reply pipe (see watcherd.ocr.child.main.main)
        return super().ocr(image)


class CudaHog(Echo):
    """For scripts/gpu-check: on a 37 px wide page, holds 4 GB of device memory and runs long
    CUDA kernels until killed."""

    def ocr(self, image: Image.Image) -> str:
        if image.width != 37:
            return super().ocr(image)
        import torch

        hold = torch.empty(4 * 1024**3, dtype=torch.uint8, device="cuda")
        a = torch.randn(8192, 8192, device="cuda")
        while True:
            a = a @ a / 8192
            torch.cuda.synchronize()
        return str(hold.shape)  # pragma: no cover


class Surrogates(Echo):
    """Returns text with a lone surrogate (what a bad decode in a model's tokenizer produces)
    and a surrogate pair that only needs joining."""

    def ocr(self, image: Image.Image) -> str:
        return "before \udce9 after \ud83d\ude00 end \udc80"


class Stuck(Echo):
    """Hangs in Python (signals not blocked) inside a function with a telling name, so that the
    timeout's stack shows where."""

    def ocr(self, image: Image.Image) -> str:
        if image.width != HANG_WIDTH:
            return super().ocr(image)
        return self.spin_inside_the_model()

    def spin_inside_the_model(self) -> str:
        while True:
            time.sleep(0.1)


GARBAGE_NOT_JSON = 41
GARBAGE_OVERSIZED = 43
GARBAGE_PARTIAL = 47
GARBAGE_NOT_OBJECT = 53
GARBAGE_MISSING_FIELDS = 59


class Garbage(Echo):
    """Writes to the protocol pipe itself (fd sys.argv[2], see watcherd.ocr.child.main.main), each trigger
    width its own way of breaking the framing or the messages."""

    def ocr(self, image: Image.Image) -> str:
        import json
        import struct

        fd = int(sys.argv[2])

        def frame(payload: bytes) -> None:
            os.write(fd, struct.pack("!i", len(payload)) + payload)

        if image.width == GARBAGE_NOT_JSON:
            frame(b"\x00\xffnot json at all")
        elif image.width == GARBAGE_OVERSIZED:
            os.write(fd, struct.pack("!iQ", -1, 2**40))  # a 1 TiB message announced
        elif image.width == GARBAGE_PARTIAL:
            os.write(fd, struct.pack("!i", 1000) + b'{"op": "pa')  # half a message, then silence
            time.sleep(3600)
        elif image.width == GARBAGE_NOT_OBJECT:
            frame(b'["op", "page"]')
        elif image.width == GARBAGE_MISSING_FIELDS:
            frame(json.dumps({"op": "cleared", "files_done": "many"}).encode())
        return super().ocr(image)


class SlowClose(Echo):
    """Never finishes `close()`: a child asked to exit stays until it is killed."""

    def close(self) -> None:
        time.sleep(3600)


class Announce(Echo):
    """Says on stdout (the daemon's log, even while the daemon is stopped) which page it reads."""

    def ocr(self, image: Image.Image) -> str:
        print(f"announce {image.width}x{image.height}", flush=True)
        return super().ocr(image)


class Lines(Echo):
    """Positions: one line over the whole image it was given ("echo WxH", one word per part), and
    a line with a box that is not a number (NaN), which the child must drop, not choke on."""

    def ocr(self, image: Image.Image) -> Any:
        from watcherd.core.text import Line, PageText, Word, box_from_rect

        w, h = image.size
        text = super().ocr(image)
        words = (Word("echo", box_from_rect(0, 0, w / 2, h), 0.5), Word(text[5:], box_from_rect(w / 2, 0, w, h), 1.0))
        nan = float("nan")
        return PageText(
            lines=(Line(text, box_from_rect(0, 0, w, h), 0.75, words), Line("lost", box_from_rect(nan, 0, 1, 1))),
            text=text,
        )


class Refuse(Echo):
    """Fails whenever it is called: for pages that must never reach an engine."""

    def ocr(self, image: Image.Image) -> str:
        raise RuntimeError("this engine must not be called")


class Batch(Echo):
    """Takes several pages per call (`ocr_batch`), saying in each page's text how many it got.
    With `slow_batches_s`, a call of more than one page takes that long (a batch too slow for the
    deadline while each page alone is quick). In either call a page of HANG_WIDTH hangs, one of
    SEGFAULT_WIDTH kills the child and one of ERROR_WIDTH raises. With `gate` (a path) it loads
    once that file exists, so that a test can queue files first."""

    def __init__(self, **options: Any):
        super().__init__(**options)
        self.slow_batches_s = float(options.get("slow_batches_s", 0))
        gate = options.get("gate")
        deadline = time.monotonic() + 60
        while gate and not os.path.exists(gate) and time.monotonic() < deadline:
            time.sleep(0.01)

    def ocr_batch(self, images: list[Image.Image]) -> list[str]:
        for image in images:
            self._misbehave(image)
        if self.slow_batches_s:
            time.sleep(self.slow_batches_s)
        return [f"{super(Batch, self).ocr(image)} (batch of {len(images)})" for image in images]

    def ocr(self, image: Image.Image) -> str:
        self._misbehave(image)
        return f"{super().ocr(image)} (alone)"

    @staticmethod
    def _misbehave(image: Image.Image) -> None:
        if image.width == HANG_WIDTH:
            time.sleep(3600)
        if image.width == SEGFAULT_WIDTH:
            ctypes.string_at(0)
        if image.width == ERROR_WIDTH:
            raise ValueError(f"the model cannot read a page {ERROR_WIDTH} pixels wide")


class Counting(Echo):
    """Appends one line per page to `options.calls_file` (and sleeps `options.delay_s`), so a test
    counts how often the engine really ran: dedupe must not OCR the same bytes twice."""

    def __init__(self, **kwargs: Any):
        super().__init__(**kwargs)
        self.calls_file = str(kwargs["calls_file"])

    def ocr(self, image: Image.Image) -> str:
        with open(self.calls_file, "a") as f:
            f.write(f"{image.width}x{image.height}\n")
        return super().ocr(image)
