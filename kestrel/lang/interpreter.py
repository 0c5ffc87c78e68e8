"""Running LLM programs: `@function`, the program state `s`, fork, run and run_batch.

`s += expr` does not block: each state has a worker thread that executes its expressions in order,
so forks run concurrently and many programs share the engine's batches. Reading a result
(`s["name"]`, `s.text()`) waits for the state's pending work.
"""
from __future__ import annotations

import contextlib
import inspect
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Iterator, Optional

from kestrel.lang.backend import Backend, EngineBackend
from kestrel.lang.ir import Concat, Gen, Role, RoleBegin, RoleEnd, Select, VarScope

EXPRESSIONS = (str, Gen, Select, Role, Concat, RoleBegin, RoleEnd, VarScope)

_default_backend: Optional[Backend] = None
_default_lock = threading.Lock()


def set_default_backend(backend) -> None:
    """Where programs run when `run` is given no backend: a Backend, or an Engine (run in-process)."""
    global _default_backend
    from kestrel.engine.engine import Engine

    _default_backend = EngineBackend(backend) if isinstance(backend, Engine) else backend


def flush_cache(backend: Optional[Backend] = None) -> None:
    """Drop the cached prefixes of `backend` (default: the default backend), as sglang.flush_cache does."""
    (backend or get_default_backend()).flush_cache()


def get_server_info(backend: Optional[Backend] = None) -> dict:
    return (backend or get_default_backend()).get_server_info()


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
        self._roles: list[tuple[str, int, str]] = []  # open messages: (role, where their content starts, end marker)
        self._scopes: dict[str, int] = {}  # open var_scope blocks: name -> where their text starts
        # with stream=True: (variable or None, text) pieces as they are produced, and whether the run is over
        self._pieces: Optional[list[tuple[Optional[str], str]]] = [] if stream else None
        self._done = False
        self._changed = threading.Condition()
        self._body_thread: Optional[threading.Thread] = None  # a streamed run's program body, running
        self._body_done = threading.Event()

    # ---- building -----------------------------------------------------------------------
    def __iadd__(self, expr) -> "ProgramState":
        if not isinstance(expr, EXPRESSIONS):
            raise TypeError(f"a program state takes strings, gen(), select() and roles, not {type(expr).__name__}")
        self._submit(self._run, expr)
        return self

    def _submit(self, fn, *args) -> None:
        self._last = self._worker.submit(self._guarded, fn, *args)

    def __setitem__(self, name: str, value) -> None:
        """Set a variable (SGLang's `s["x"] = value`), in order with the expressions before it."""
        self._submit(self._set, name, value, {})

    set_var = __setitem__

    @contextlib.contextmanager
    def _block(self, begin, end):
        self += begin
        try:
            yield self
        finally:
            self += end

    def system(self):
        """`with s.system(): s += ...`: what is added inside is a system message (also s.user(), s.assistant())."""
        return self._block(RoleBegin("system"), RoleEnd("system"))

    def user(self):
        return self._block(RoleBegin("user"), RoleEnd("user"))

    def assistant(self):
        return self._block(RoleBegin("assistant"), RoleEnd("assistant"))

    def var_scope(self, name: str):
        """`with s.var_scope("x"): s += ...`: the text added inside also becomes variable `x`."""
        return self._block(VarScope(name, True), VarScope(name, False))

    def fork(self, n: int) -> "ForkGroup":
        """n copies of this state that continue independently (and concurrently)."""
        self.sync()
        if n > 1 and self._text:  # compute the shared prefix once, so the forks all find it in the radix cache
            self._call(self._text, {"max_tokens": 0}, record=False)  # prefill only: nothing sampled
        children = [ProgramState(self.backend, _parent=self) for _ in range(n)]
        self._children += children
        return ForkGroup(children, self)

    # ---- reading ------------------------------------------------------------------------
    def sync(self) -> "ProgramState":
        """Wait for every expression submitted so far (from outside a streamed run's body: for the body to
        finish submitting first); re-raise the first error."""
        body = self._body_thread
        if body is not None and threading.current_thread() is not body:
            self._body_done.wait()
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

    get_var = __getitem__

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

    def text_iter(self, var_name: Optional[str] = None) -> Iterator[str]:
        """Text as it is produced: with stream=True, literal pieces and generated increments (of variable
        `var_name` only, if given); without, the whole text (or the variable) once it is done."""
        if self._pieces is None:
            yield self.text() if var_name is None else self[var_name]
            return
        seen = 0
        while True:
            with self._changed:
                self._changed.wait_for(lambda: len(self._pieces) > seen or self._done)
                new, seen, done = self._pieces[seen:], len(self._pieces), self._done and len(self._pieces) == seen
            for var, text in new:
                if var_name is None or var == var_name:
                    yield text
            if done:
                if self._error is not None:
                    raise self._error
                return

    def _publish(self, var: Optional[str], text: str) -> None:
        if self._pieces is not None and text:
            with self._changed:
                self._pieces.append((var, text))
                self._changed.notify_all()

    def __repr__(self) -> str:
        return f"ProgramState(text={self.text()!r})"

    # ---- execution (on the worker thread) -----------------------------------------------
    def _guarded(self, fn, *args) -> None:
        if self._error is not None:
            return
        try:
            fn(*args)
        except BaseException as e:  # surfaced at the next read
            self._keep_error(e)

    def _keep_error(self, e: BaseException) -> None:
        if self._error is None:
            self._error = e

    def _append(self, text: str, var: Optional[str] = None) -> None:
        self._text += text
        self._publish(var, text)

    def _run(self, expr) -> None:
        if isinstance(expr, str):
            self._append(expr)
        elif isinstance(expr, Concat):
            for part in expr.parts:
                self._run(part)
        elif isinstance(expr, Role):
            self._run(RoleBegin(expr.role))
            for part in expr.content:
                self._run(part)
            self._run(RoleEnd(expr.role))
        elif isinstance(expr, RoleBegin):
            begin, end = self.backend.role_markers(expr.role, first=not self._messages and not self._text)
            self._append(begin)
            self._roles.append((expr.role, len(self._text), end))
        elif isinstance(expr, RoleEnd):
            if not self._roles or self._roles[-1][0] != expr.role:
                raise ValueError(f"{expr.role}_end() closes no open {expr.role} message")
            role, start, end = self._roles.pop()
            self._messages.append({"role": role, "content": self._text[start:]})
            self._append(end)
        elif isinstance(expr, VarScope):
            if expr.begin:
                self._scopes[expr.name] = len(self._text)
            else:
                self._set(expr.name, self._text[self._scopes.pop(expr.name):], {})
        elif isinstance(expr, Gen):
            self._gen(expr)
        elif isinstance(expr, Select):
            best, scores = self.backend.select(self._text, expr.choices, expr.method)
            self._append(expr.choices[best], expr.name)
            self._set(expr.name, expr.choices[best], {"normalized_prompt_logprobs": scores})  # SGLang's key

    def _gen(self, expr: Gen) -> None:
        params = {k: v for k, v in expr.sampling.items() if v is not None}
        params.update(expr.constraint)
        if expr.logprobs.get("return_logprob"):
            params["logprobs"] = expr.logprobs.get("top_logprobs_num") or 0
        on_text = (lambda piece: self._publish(expr.name, piece)) if self._pieces is not None else None
        out = self._call(self._text, params, on_text=on_text, lora=expr.lora)
        self._text += out["text"]  # (already streamed piece by piece)
        self._set(expr.name, out["text"], out["meta_info"])

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
            with self._changed:
                self._done = True
                self._changed.notify_all()


class ForkGroup(list):
    """The states `s.fork(n)` returns (a list), with SGLang's group operations: `forks += expr` adds to every
    fork (a callable gets the fork's index, a list gives one expression each) and `join` brings results back."""

    def __init__(self, states: list[ProgramState], parent: ProgramState):
        super().__init__(states)
        self.parent = parent
        self.start = len(parent._text)  # where the forks' own text begins (the parent was synced to fork)

    def __iadd__(self, other) -> "ForkGroup":
        if callable(other):
            for i, state in enumerate(self):
                state += other(i)
        elif isinstance(other, (list, tuple)):
            if len(other) != len(self):
                raise ValueError(f"{len(other)} expressions for {len(self)} forks")
            for state, expr in zip(self, other):
                state += expr
        else:
            for state in self:
                state += other
        return self

    def join(self, mode: str = "gather_variable") -> None:
        """Wait for the forks. "gather_variable": each variable the forks defined becomes a list (one value per
        fork) on the parent; "concate_and_append": the forks' new text is appended to the parent's, in order."""
        if mode not in ("gather_variable", "concate_and_append"):
            raise ValueError(f"join mode must be 'gather_variable' or 'concate_and_append', got {mode!r}")
        for state in self:
            state.sync()
        if mode == "gather_variable":
            inherited = set(self.parent.sync()._vars)
            for state in self:
                for name in state._vars.keys() - inherited:
                    self.parent._vars.setdefault(name, []).append(state._vars[name])
        else:
            self.parent += "".join(state._text[self.start:] for state in self)


class Function:
    """A program: `@kestrel.function def f(s, ...)`. Call it (or `run`), or `run_batch`."""

    def __init__(self, fn: Callable):
        self.fn = fn
        self.__doc__ = fn.__doc__
        self.__name__ = fn.__name__
        params = list(inspect.signature(fn).parameters)
        if not params:
            raise TypeError(f"{fn.__name__}: a program takes the state as its first argument")
        self.arg_names = params[1:]

    def __call__(self, *args, **kwargs) -> ProgramState:
        """`prog(arg=...)` runs the program as `run` does (SGLang's call)."""
        return self.run(*args, **kwargs)

    def run(self, *args, backend: Optional[Backend] = None, stream: bool = False, **kwargs) -> ProgramState:
        """Run once; returns the finished state (with stream=True it returns at once: iterate
        `state.text_iter()`)."""
        state = ProgramState(backend or get_default_backend(), stream=stream)
        if stream:
            state._body_thread = threading.Thread(target=self._execute, args=(state, args, kwargs), daemon=True)
            state._body_thread.start()
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
        finally:
            state._body_done.set()
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
