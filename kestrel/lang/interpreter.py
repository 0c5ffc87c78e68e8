"""Running LLM programs: `@function`, the program state `s`, fork, run and run_batch.

`s += expr` does not block: each state has a worker thread that executes its expressions in order,
so forks run concurrently and many programs share the engine's batches. Reading a result
(`s["name"]`, `s.text()`) waits for the state's pending work.
"""
from __future__ import annotations

import inspect
import queue
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Iterator, Optional

from kestrel.lang.backend import Backend, EngineBackend
from kestrel.lang.ir import Concat, Gen, Role, Select

_default_backend: Optional[Backend] = None
_default_lock = threading.Lock()


def set_default_backend(backend) -> None:
    """Where programs run when `run` is given no backend: a Backend, or an Engine (run in-process)."""
    global _default_backend
    from kestrel.engine.engine import Engine

    _default_backend = EngineBackend(backend) if isinstance(backend, Engine) else backend


def get_default_backend() -> Backend:
    global _default_backend
    with _default_lock:
        if _default_backend is None:  # the embedded model, in this process
            _default_backend = EngineBackend()
        return _default_backend


class ProgramState:
    """The `s` of a program: its text so far, chat messages, and named results."""

    def __init__(self, backend: Backend, stream: bool = False, _parent: Optional["ProgramState"] = None):
        self.backend = backend
        self._text = "" if _parent is None else _parent._text
        self._messages: list[dict] = [] if _parent is None else [dict(m) for m in _parent._messages]
        self._vars: dict[str, Any] = {} if _parent is None else dict(_parent._vars)
        self._meta: dict[str, Any] = {} if _parent is None else dict(_parent._meta)
        self.calls: list[dict] = [] if _parent is None else _parent.calls  # meta_info of every backend call
        self._children: list[ProgramState] = []
        self._worker = ThreadPoolExecutor(1, thread_name_prefix="kestrel-program")
        self._last = None  # future of the last submitted expression
        self._error: Optional[BaseException] = None
        self._stream: Optional[queue.SimpleQueue] = queue.SimpleQueue() if stream else None

    # ---- building -----------------------------------------------------------------------
    def __iadd__(self, expr) -> "ProgramState":
        if not isinstance(expr, (str, Gen, Select, Role, Concat)):
            raise TypeError(f"a program state takes strings, gen(), select() and roles, not {type(expr).__name__}")
        self._last = self._worker.submit(self._run_guarded, expr)
        return self

    def fork(self, n: int) -> list["ProgramState"]:
        """n copies of this state that continue independently (and concurrently)."""
        self.sync()
        if n > 1:  # compute the shared prefix once, so the forks all find it in the radix cache
            self._call(self._text, {"max_tokens": 1, "temperature": 0.0}, record=False)
        children = [ProgramState(self.backend, _parent=self) for _ in range(n)]
        self._children += children
        return children

    # ---- reading ------------------------------------------------------------------------
    def sync(self) -> "ProgramState":
        """Wait for every expression submitted so far; re-raise the first error."""
        if self._last is not None:
            self._last.result()
        if self._error is not None:
            raise self._error
        return self

    def __getitem__(self, name: str):
        self.sync()
        if name not in self._vars:
            raise KeyError(f"no variable {name!r}; the program defined {sorted(self._vars)}")
        return self._vars[name]

    def __contains__(self, name: str) -> bool:
        return name in self.sync()._vars

    def text(self) -> str:
        return self.sync()._text

    def messages(self) -> list[dict]:
        return [dict(m) for m in self.sync()._messages]

    def variables(self) -> dict[str, Any]:
        return dict(self.sync()._vars)

    def get_meta_info(self, name: str) -> dict:
        self.sync()
        return self._meta[name]

    def text_iter(self) -> Iterator[str]:
        """Text as it is produced (run with stream=True): literal pieces and generated increments."""
        if self._stream is None:
            raise ValueError("run the program with stream=True to iterate over its text")
        while True:
            piece = self._stream.get()
            if piece is None:
                return
            yield piece

    def __repr__(self) -> str:
        return f"ProgramState(text={self.text()!r})"

    # ---- execution (on the worker thread) -----------------------------------------------
    def _run_guarded(self, expr) -> None:
        if self._error is not None:
            return
        try:
            self._run(expr)
        except BaseException as e:  # surfaced at the next read
            self._keep_error(e)

    def _keep_error(self, e: BaseException) -> None:
        if self._error is None:
            self._error = e

    def _append(self, text: str) -> None:
        self._text += text
        if self._stream is not None and text:
            self._stream.put(text)

    def _run(self, expr) -> None:
        if isinstance(expr, str):
            self._append(expr)
        elif isinstance(expr, Concat):
            for part in expr.parts:
                self._run(part)
        elif isinstance(expr, Role):
            begin, end = self.backend.role_markers(expr.role, first=not self._messages and not self._text)
            self._append(begin)
            start = len(self._text)
            for part in expr.content:
                self._run(part)
            self._messages.append({"role": expr.role, "content": self._text[start:]})
            self._append(end)
        elif isinstance(expr, Gen):
            params = {k: v for k, v in expr.sampling.items() if v is not None}
            params.update(expr.constraint)
            on_text = self._stream.put if self._stream is not None else None
            out = self._call(self._text, params, on_text=on_text, lora=expr.lora)
            self._text += out["text"]  # (already streamed piece by piece)
            self._set(expr.name, out["text"], out["meta_info"])
        elif isinstance(expr, Select):
            best, scores = self.backend.select(self._text, expr.choices)
            self._append(expr.choices[best])
            self._set(expr.name, expr.choices[best], {"normalized_logprobs": scores})

    def _call(self, prompt: str, params: dict, on_text=None, record: bool = True, lora: Optional[str] = None) -> dict:
        out = self.backend.generate(prompt, params, on_text, lora=lora) if lora else self.backend.generate(
            prompt, params, on_text)
        if record:
            self.calls.append(out["meta_info"])
        return out

    def _set(self, name: Optional[str], value, meta) -> None:
        if name is not None:
            self._vars[name] = value
            self._meta[name] = meta

    def _finish(self) -> None:
        """Wait for this state and its forks, then release their worker threads."""
        try:
            self.sync()
            for child in self._children:
                child._finish()
        finally:
            self._worker.shutdown(wait=False)
            if self._stream is not None:
                self._stream.put(None)


class Function:
    """A program: `@kestrel.function def f(s, ...)`. Call `run` or `run_batch`."""

    def __init__(self, fn: Callable):
        self.fn = fn
        self.__doc__ = fn.__doc__
        self.__name__ = fn.__name__
        params = list(inspect.signature(fn).parameters)
        if not params:
            raise TypeError(f"{fn.__name__}: a program takes the state as its first argument")
        self.arg_names = params[1:]

    def run(self, *args, backend: Optional[Backend] = None, stream: bool = False, **kwargs) -> ProgramState:
        """Run once; returns the finished state (with stream=True it returns at once: iterate
        `state.text_iter()`)."""
        state = ProgramState(backend or get_default_backend(), stream=stream)
        if stream:
            threading.Thread(target=self._execute, args=(state, args, kwargs), daemon=True).start()
            return state
        self._execute(state, args, kwargs)
        if state._error is not None:
            raise state._error
        return state

    def _execute(self, state: ProgramState, args, kwargs) -> None:
        """Run the program body, then wait for the state and its forks; the first error stays on the state."""
        try:
            self.fn(state, *args, **kwargs)
        except BaseException as e:
            state._keep_error(e)
        try:
            state._finish()
        except BaseException as e:
            state._keep_error(e)

    def run_batch(self, batch_kwargs: list[dict], backend: Optional[Backend] = None, num_threads: int = 64,
                  progress_bar: bool = False) -> list[ProgramState]:
        """Run the program once per dict of arguments, concurrently; states come back in input order."""
        backend = backend or get_default_backend()
        bar = None
        if progress_bar:
            from tqdm import tqdm
            bar = tqdm(total=len(batch_kwargs), desc=self.__name__, unit="run")

        def one(kw: dict) -> ProgramState:
            try:
                return self.run(backend=backend, **kw)
            finally:
                if bar is not None:
                    bar.update(1)

        with ThreadPoolExecutor(max(1, min(num_threads, len(batch_kwargs)))) as pool:
            states = list(pool.map(one, batch_kwargs))
        if bar is not None:
            bar.close()
        return states


def function(fn: Callable) -> Function:
    """Decorate a Python function `f(s, ...)` to make it an LLM program."""
    return Function(fn)
