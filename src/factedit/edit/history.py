"""The edits applied to one model, newest last, and the method state they built (AlphaEdit's key
memory), so that any number of them can be undone bit-exactly.

The state is never stored per edit (it is d_ff × d_ff per layer): each stateful edit keeps only its
batch's keys, and undoing one replays the keys of the remaining edits on top of the state that
preceded the oldest of them, which reproduces it bit for bit.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence

from .methods.batch import add_keys
from .results import EditResult

__all__ = ["History"]


class History:
    """Applied :class:`~factedit.edit.results.EditResult` objects and the method state.

    Attributes:
        results: the applied edits, oldest first.
        state: per method, the state carried across sequential edits (AlphaEdit: ``{layer: K_p K_pᵀ}``).
    """

    def __init__(self):
        self.results: List[EditResult] = []
        self.state: Dict[str, dict] = {}
        # per method, the state before its oldest stateful edit in the history (the replay base)
        self._base: Dict[str, Optional[dict]] = {}

    def add_state(self, result: EditResult, pending: Sequence[EditResult] = ()) -> None:
        """Fold a just-applied ``result``'s keys into its method's state (``pending``: results of the
        same call applied before it, not yet in :attr:`results`)."""
        if result.state_keys is None:
            return
        key = result.method
        if not any(r.stateful and r.method == key for r in [*self.results, *pending]):
            self._base[key] = self.state.get(key)
        self.state[key] = add_keys(self.state.get(key), result.state_keys)

    def undo(self, result: EditResult) -> None:
        """Revert the weights of ``result`` (not in :attr:`results`, or about to leave it) and restore
        the method state as if it had never been applied."""
        result.revert()
        self.release(result)

    def release(self, result: EditResult) -> None:
        """The method state as if ``result`` (not in :attr:`results`, or about to leave it) had never been
        applied, its weights left as they are (another history takes it over)."""
        if not result.stateful:
            return
        state = self._base.get(result.method)
        for r in self.results:
            if r.stateful and r.method == result.method and r is not result:
                state = add_keys(state, r.state_keys)
        if state is None:
            self.state.pop(result.method, None)
        else:
            self.state[result.method] = state

    def pop(self) -> EditResult:
        """Remove the newest edit from the history and undo it."""
        result = self.results.pop()
        self.undo(result)
        return result
