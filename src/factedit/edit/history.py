"""The edits applied to one model, newest last, and the method state they built (AlphaEdit's key
memory), so that any number of them can be undone bit-exactly.

    history.push(result)        # just applied: its state updates are folded in
    history.pop()               # the newest edit undone (weights and state), and returned

The state is never stored per edit (it is d_ff × d_ff per layer): each stateful edit keeps only its
updates (a batch's keys), and undoing one replays the updates of the remaining edits on top of the
state that preceded the oldest of them (the registration's ``fold_state``), which reproduces it bit for bit.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Tuple

from .methods.registry import method_spec
from .results import EditResult

__all__ = ["History"]


class History:
    """Applied :class:`~factedit.edit.results.EditResult` objects and the method state.

    Attributes:
        state: per method, the state carried across sequential edits (AlphaEdit: ``{layer: K_p K_pᵀ}``).
    """

    def __init__(self):
        self._results: List[EditResult] = []
        self.state: Dict[str, dict] = {}
        # per method, the state before its oldest stateful edit in the history (the replay base)
        self._base: Dict[str, Optional[dict]] = {}

    @property
    def results(self) -> Tuple[EditResult, ...]:
        """The applied edits, oldest first."""
        return tuple(self._results)

    def __len__(self) -> int:
        return len(self._results)

    def push(self, result: EditResult) -> None:
        """Add a just-applied ``result`` (its weights written) and fold its state updates into its method's state."""
        if result.stateful:
            key = result.method
            if not any(r.stateful and r.method == key for r in self._results):
                self._base[key] = self.state.get(key)
            self.state[key] = _fold(key, self.state.get(key), result.state_updates)
        self._results.append(result)

    def pop(self) -> EditResult:
        """Undo the newest edit (weights and method state) and return it."""
        result = self.take()
        result.revert()
        return result

    def take(self) -> EditResult:
        """Remove the newest edit, its weights left as they are (another history takes it over): the method
        state is as if it had never been applied."""
        result = self._results.pop()
        if result.stateful:
            state = self._base.get(result.method)
            for r in self._results:
                if r.stateful and r.method == result.method:
                    state = _fold(r.method, state, r.state_updates)
            if state is None:
                self.state.pop(result.method, None)
            else:
                self.state[result.method] = state
        return result

    def merge_last(self, n: int, result: EditResult) -> None:
        """Let ``result`` stand for the newest ``n`` edits (made in one call, one after another; ``result``
        reverts all of them and carries their state updates in order)."""
        if n > len(self._results):
            raise ValueError(f"cannot merge {n} edits: the history holds {len(self._results)}")
        del self._results[len(self._results) - n:]
        self._results.append(result)


def _fold(method: str, state: Optional[dict], updates) -> dict:
    fold = method_spec(method).fold_state
    for update in updates:
        state = fold(state, update)
    return state
