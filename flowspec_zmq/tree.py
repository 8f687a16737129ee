"""The draft token tree: a pure data structure (no model, no I/O).

The root is the newest committed token; its KV is not yet in the stages' committed prefix. Every
other node is a draft token. Node ids are unique for the life of a request and never reused, so a
stale id in a message in flight can never be mistaken for a live node; "re-indexing" after a prune
is therefore just dropping ids. A node's score is its cumulative draft log-probability from the
root when it was drafted; scores never increase along a path, so score order puts parents first.
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass, field
from typing import Iterable, Sequence

ROOT_PARENT = -1


@dataclass
class Node:
    id: int
    token: int
    parent: int
    depth: int
    position: int
    score: float
    sent: bool = False
    expanded: bool = False  # the draft has proposed this node's children
    # The target's choice of the next token after this node, once its hidden state came back.
    target: int | None = None
    children: dict[int, int] = field(default_factory=dict)  # token -> child id


@dataclass(frozen=True)
class DraftTree:
    """A draft source's proposal below a root: parents index earlier entries, -1 is the root."""

    tokens: tuple[int, ...]
    parents: tuple[int, ...]
    scores: tuple[float, ...]

    @staticmethod
    def empty() -> DraftTree:
        return DraftTree((), (), ())


@dataclass(frozen=True)
class Added:
    """What a draft step added: new node ids, and children dropped because a verification removed
    their parent while the step ran (stale proposals)."""

    created: tuple[int, ...]
    stale: int


@dataclass(frozen=True)
class Advance:
    """What one verification changed: tokens newly committed, node rows whose KV joins the committed
    prefix, and the sent nodes that survive (the new root's subtree)."""

    tokens: tuple[int, ...]
    accepted: tuple[int, ...]
    survivors: tuple[int, ...]


class TokenTree:
    def __init__(self, root_token: int, root_position: int) -> None:
        self.nodes: dict[int, Node] = {}
        self._next_id = 0
        self.root = self._new_node(root_token, ROOT_PARENT, 0, root_position, 0.0)

    def _new_node(self, token: int, parent: int, depth: int, position: int, score: float) -> int:
        node = Node(self._next_id, token, parent, depth, position, score)
        self._next_id += 1
        self.nodes[node.id] = node
        if parent != ROOT_PARENT:
            self.nodes[parent].children[token] = node.id
        return node.id

    def __len__(self) -> int:
        return len(self.nodes)

    def __contains__(self, node_id: int) -> bool:
        return node_id in self.nodes

    def add_child(self, parent: int, token: int, score: float) -> int:
        """The child of `parent` with this token, created if new (siblings are never duplicated)."""
        existing = self.nodes[parent].children.get(token)
        if existing is not None:
            return existing
        p = self.nodes[parent]
        return self._new_node(token, parent, p.depth + 1, p.position + 1, score)

    def merge(self, draft: DraftTree) -> list[int]:
        """Graft a draft rooted at our root, matching by token path; returns the ids of new nodes."""
        mapped: list[int] = []
        created: list[int] = []
        for token, parent, score in zip(draft.tokens, draft.parents, draft.scores):
            parent_id = self.root if parent == ROOT_PARENT else mapped[parent]
            existing = self.nodes[parent_id].children.get(token)
            if existing is None:
                node_id = self.add_child(parent_id, token, score)
                created.append(node_id)
            else:
                # Raising a matched node to its fresh score keeps every parent scored above its
                # children, old and new, so score order still sends parents first.
                node_id = existing
                self.nodes[node_id].score = max(self.nodes[node_id].score, score)
            mapped.append(node_id)
        return created

    def pending(self) -> int:
        """Draft nodes the target has not judged yet (the root does not count)."""
        return sum(1 for n in self.nodes.values() if n.target is None and n.id != self.root)

    def add_proposals(self, proposals: Sequence[tuple[int, Sequence[tuple[int, float]]]], budget: int) -> Added:
        """Graft a draft step's children ((parent id, [(token, log-prob)])) by cumulative score, best
        first. At `budget` pending nodes a child replaces the worst spare leaf (unsent, unexpanded)
        if it scores better: the tree converges on the best `budget` candidates, as EAGLE-2's
        re-ranking does, without redrafting. A parent that is gone (pruned while the step ran)
        drops its children: they were drafted for a branch that no longer exists."""
        stale = 0
        candidates: list[tuple[float, int, int]] = []
        for parent_id, children in proposals:
            parent = self.nodes.get(parent_id)
            if parent is None:
                stale += len(children)
                continue
            parent.expanded = True
            candidates.extend((parent.score + logprob, parent_id, token)
                              for token, logprob in children if token not in parent.children)
        candidates.sort(key=lambda c: -c[0])
        spare = self._spare_leaves()
        pending = self.pending()
        created: list[int] = []
        for score, parent_id, token in candidates:
            if pending >= budget:
                if not spare or spare[0][0] >= score:
                    break
                self._drop_leaf(heapq.heappop(spare)[1])
                pending -= 1
            node_id = self.add_child(parent_id, token, score)
            created.append(node_id)
            heapq.heappush(spare, (score, node_id))
            pending += 1
        return Added(tuple(created), stale)

    def expansion_floor(self, budget: int) -> float:
        """Children score at most their parent's score: a node scoring no better than the worst
        spare leaf of a full tree cannot add anything, so expansion stops there."""
        if self.pending() < budget:
            return -math.inf
        spare = self._spare_leaves()
        return spare[0][0] if spare else math.inf

    def _spare_leaves(self) -> list[tuple[float, int]]:
        """Min-heap (score, id) of the nodes that can be dropped at no cost: drafted, not sent,
        not expanded, no children."""
        heap = [(n.score, n.id) for n in self.nodes.values()
                if not n.sent and not n.expanded and not n.children and n.id != self.root and n.target is None]
        heapq.heapify(heap)
        return heap

    def _drop_leaf(self, node_id: int) -> None:
        node = self.nodes.pop(node_id)
        del self.nodes[node.parent].children[node.token]

    def path_tokens(self, node_id: int) -> list[int]:
        """Tokens from just below the root down to this node."""
        tokens = []
        while node_id != self.root:
            node = self.nodes[node_id]
            tokens.append(node.token)
            node_id = node.parent
        return tokens[::-1]

    def subtree(self, node_id: int) -> list[int]:
        out, stack = [], [node_id]
        while stack:
            current = stack.pop()
            out.append(current)
            stack.extend(self.nodes[current].children.values())
        return out

    def unsent(self) -> list[Node]:
        """Nodes not yet sent, best first; a parent always precedes its children (a child that
        ranks above its unsent parent waits until the parent is listed)."""
        waiting = sorted((n for n in self.nodes.values() if not n.sent), key=lambda n: (-n.score, n.depth, n.id))
        listed: set[int] = set()
        ordered: list[Node] = []
        deferred: dict[int, list[Node]] = {}  # unlisted parent id -> children waiting for it
        for node in waiting:
            parent = self.nodes.get(node.parent)
            if node.id != self.root and parent is not None and not parent.sent and parent.id not in listed:
                deferred.setdefault(parent.id, []).append(node)
                continue
            stack = [node]
            while stack:
                current = stack.pop()
                ordered.append(current)
                listed.add(current.id)
                stack.extend(reversed(deferred.pop(current.id, [])))
        return ordered

    def mark_sent(self, nodes: Iterable[Node]) -> None:
        for node in nodes:
            node.sent = True

    def set_targets(self, node_ids: Sequence[int], targets: Sequence[int]) -> None:
        for node_id, target in zip(node_ids, targets):
            if node_id in self.nodes:
                self.nodes[node_id].target = target

    def verify(self) -> Advance:
        """Walk from the root while the target has spoken: each step commits the target's token,
        then descends into the child holding it. Stops at a node still in flight (it becomes the
        root, its subtree survives) or where no child matches (a fresh root, the round ends)."""
        tokens: list[int] = []
        accepted: list[int] = []
        node = self.nodes[self.root]
        while node.target is not None:
            accepted.append(node.id)
            tokens.append(node.target)
            child = node.children.get(node.target)
            if child is None:
                self._reroot(self._new_node(node.target, node.id, node.depth + 1, node.position + 1, 0.0))
                break
            node = self.nodes[child]
        else:
            if accepted:
                self._reroot(node.id)
        survivors = tuple(n.id for n in self.nodes.values() if n.sent)
        return Advance(tuple(tokens), tuple(accepted), survivors)

    def _reroot(self, new_root: int) -> None:
        keep = self.subtree(new_root)
        base = self.nodes[new_root]
        base_depth, base_score = base.depth, base.score
        self.nodes = {i: self.nodes[i] for i in keep}
        # Scores become relative to the new root so fresh drafts and old nodes rank together.
        for node in self.nodes.values():
            node.depth -= base_depth
            node.score -= base_score
        base.parent = ROOT_PARENT
        self.root = new_root

    def in_flight(self) -> list[int]:
        return [n.id for n in self.nodes.values() if n.sent and n.target is None]
