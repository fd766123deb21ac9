"""A third-party plugin as graphopt sees one: passes registered through the entry-point group.

Its passes are wrong on purpose, so the tests can show that verification catches them:
- `scale-filter` scales filter 0 of every Conv by `factor` (wrong at every site unless factor=1);
- `reweight-convs` doubles every Conv's weights and halves its output (exact in floating point),
  except at the conv named in `wrong_at`, where it halves by `1/1.02` of the right amount;
- `raise-at` rewrites like `reweight-convs` but raises at the conv named in `wrong_at`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from graphopt import GraphPass, PassStats, Site
from graphopt.graphs import make_constant, nodes_with_op, unique_name


@dataclass(frozen=True)
class ScaleFilterOptions:
    factor: float = 1.02


class ScaleFilter(GraphPass[ScaleFilterOptions]):
    name = "scale-filter"
    summary = "TEST ONLY: scale filter 0 of each Conv (a wrong rewrite)."
    Options = ScaleFilterOptions

    def find_sites(self, graph: gs.Graph, stats: PassStats) -> list[Site]:
        return [Site(n.name) for n in nodes_with_op(graph, "Conv") if isinstance(n.inputs[1], gs.Constant)]

    def rewrite_site(self, graph: gs.Graph, site: Site, stats: PassStats) -> None:
        conv = next(n for n in graph.nodes if n.name == site.key)
        weight = conv.inputs[1].values.copy()
        weight[0] *= self.options.factor
        conv.inputs[1] = make_constant(graph, f"{conv.name}_scaled_w", weight)


@dataclass(frozen=True)
class ReweightOptions:
    wrong_at: str = ""


class ReweightConvs(GraphPass[ReweightOptions]):
    name = "reweight-convs"
    summary = "TEST ONLY: W -> 2W then x0.5 after each Conv; wrong at the conv named wrong-at."
    Options = ReweightOptions

    def find_sites(self, graph: gs.Graph, stats: PassStats) -> list[Site]:
        return [Site(n.name) for n in nodes_with_op(graph, "Conv") if isinstance(n.inputs[1], gs.Constant)]

    def rewrite_site(self, graph: gs.Graph, site: Site, stats: PassStats) -> None:
        conv = next(n for n in graph.nodes if n.name == site.key)
        self.check_site(site)
        conv.inputs[1] = make_constant(graph, f"{conv.name}_w2", conv.inputs[1].values * 2)
        if len(conv.inputs) > 2:
            conv.inputs[2] = make_constant(graph, f"{conv.name}_b2", conv.inputs[2].values * 2)
        half = 0.5 / 1.02 if site.key == self.options.wrong_at else 0.5
        out = conv.outputs[0]
        doubled = gs.Variable(unique_name(graph, f"{conv.name}_doubled"), dtype=out.dtype)
        conv.outputs[0] = doubled
        factor = make_constant(graph, f"{conv.name}_half", np.array(half, dtype=np.float32))
        graph.nodes.append(gs.Node("Mul", unique_name(graph, f"{conv.name}_halve"), inputs=[doubled, factor], outputs=[out]))
        stats.counters["convs_reweighted"] += 1

    def check_site(self, site: Site) -> None:
        pass


class RaiseAt(ReweightConvs):
    name = "raise-at"
    summary = "TEST ONLY: like reweight-convs, but raises at the conv named wrong-at."

    def check_site(self, site: Site) -> None:
        if site.key == self.options.wrong_at:
            raise RuntimeError(f"deliberate failure at {site.key}")
