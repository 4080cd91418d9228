"""A process that imports tunelab once, then forks one child per `tunelab` command line.

The crash tests kill training processes many times; starting Python and importing torch,
transformers and peft for each would take seconds. The server imports them and runs no
torch computation itself, so its forked children start in milliseconds and each one is a
real, separate `tunelab` process: it can be killed with SIGKILL, sent SIGTERM/SIGINT, or
made to kill itself at an exact point of a save (`fault`).

Protocol, one JSON object a line: the client writes {"argv", "log", "fault"}; the server
answers {"pid"} as soon as the child runs and {"pid", "exit", "signal"} when it ends.
`ForkServer` is the client side, used by the tests.
"""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path


# -- faults injected into a child ---------------------------------------------------------

def install_fault(target: str, call: int) -> None:
    """Make the child SIGKILL itself at the `call`-th call of `target` (counted from start).

    `os.fsync`, `os.rename`, `os.replace`, `os.unlink`: killed just before the call (a save
    or a delete cut short). `torch.save`, `safetensors`: the file is written, cut to half
    its size, then the process dies (a torn write). `slow_steps` is no fault: each
    optimizer step sleeps `call` milliseconds first, so a test can signal mid-step.
    """
    import peft.peft_model
    import torch

    import tunelab.train

    if target == "slow_steps":
        original_rows = tunelab.train.step_rows

        def slow_rows(*args, **kwargs):
            time.sleep(call / 1000)
            return original_rows(*args, **kwargs)
        tunelab.train.step_rows = slow_rows
        return

    count = {"n": 0}

    def wrap(original, torn: bool):
        def faulty(*args, **kwargs):
            count["n"] += 1
            if count["n"] < call:
                return original(*args, **kwargs)
            if not torn:
                os.kill(os.getpid(), signal.SIGKILL)
            result = original(*args, **kwargs)
            path = Path(args[1] if len(args) > 1 else kwargs.get("filename") or kwargs.get("f"))
            with open(path, "r+b") as f:
                f.truncate(path.stat().st_size // 2)
            os.kill(os.getpid(), signal.SIGKILL)
            return result
        return faulty

    if target in ("os.fsync", "os.rename", "os.replace", "os.unlink"):
        name = target.split(".")[1]
        setattr(os, name, wrap(getattr(os, name), torn=False))
    elif target == "torch.save":
        torch.save = wrap(torch.save, torn=True)
    elif target == "safetensors":
        peft.peft_model.safe_save_file = wrap(peft.peft_model.safe_save_file, torn=True)
    else:
        raise ValueError(target)


def serve() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import peft  # noqa: F401  (imported once, shared by every child)
    import torch  # noqa: F401
    import transformers  # noqa: F401

    import tunelab.cli
    from tunelab.train import train

    # Children parse only the verb they run: building every verb's parser costs ~2 s a child.
    tunelab.cli.verbs = lambda: {"train": train}
    print(json.dumps({"ready": os.getpid()}), flush=True)
    for line in sys.stdin:
        job = json.loads(line)
        pid = os.fork()
        if pid == 0:  # the child: one `tunelab` command, output to its log
            code = 3
            try:
                fd = os.open(job["log"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
                os.dup2(fd, 1)
                os.dup2(fd, 2)
                sys.stdout.reconfigure(line_buffering=True)  # a killed child's log is whole
                signal.signal(signal.SIGINT, signal.default_int_handler)
                if job.get("fault"):
                    install_fault(**job["fault"])
                try:
                    tunelab.cli.main(job["argv"])
                    code = 0
                except SystemExit as exit_:
                    code = exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
            except BaseException:  # noqa: BLE001  (a crash must still end the child)
                import traceback

                traceback.print_exc()
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        print(json.dumps({"pid": pid}), flush=True)
        _, status = os.waitpid(pid, 0)
        print(json.dumps({"pid": pid,
                          "exit": os.WEXITSTATUS(status) if os.WIFEXITED(status) else None,
                          "signal": os.WTERMSIG(status) if os.WIFSIGNALED(status) else None}), flush=True)


# -- the client -----------------------------------------------------------------------------

class ForkServer:
    """Start the server; `start` a command (returns the child's pid), `wait` for its end."""

    def __init__(self, env: dict | None = None):
        self.proc = subprocess.Popen([sys.executable, __file__], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True, env=env)
        self.running: int | None = None
        self._read(120)

    def _read(self, timeout: float) -> dict:
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        if not ready:
            raise TimeoutError(f"fork server silent for {timeout} s")
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"fork server ended (exit {self.proc.wait()})")
        return json.loads(line)

    def start(self, argv: list[str], log: Path, fault: dict | None = None) -> int:
        self.proc.stdin.write(json.dumps({"argv": argv, "log": str(log), "fault": fault}) + "\n")
        self.proc.stdin.flush()
        self.running = self._read(60)["pid"]
        return self.running

    def wait(self, timeout: float = 300) -> dict:
        ended = self._read(timeout)
        self.running = None
        return ended

    def run(self, argv: list[str], log: Path, fault: dict | None = None, timeout: float = 300) -> dict:
        self.start(argv, log, fault)
        return self.wait(timeout)

    def close(self) -> None:
        if self.running:  # a test failed with a child still running
            try:
                os.kill(self.running, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.proc.stdin.close()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def wait_for(predicate, timeout: float, every: float = 0.02) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(every)
    return predicate()


if __name__ == "__main__":
    serve()
