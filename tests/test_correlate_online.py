"""The online check, slice by slice as a FIB-SEM run delivers them: confirmed on the chosen cell, flagged on a neighbour.

Both runs start where a run on the chosen cell would, at its middle (the first half of the cell is trimmed away
while the block is prepared), and go on 2 µm past the first verdict, to show that it holds. The chosen cell is the droplet-rich one the
operator picks in the middle square; the neighbour is the cell nearest to it. Slices arrive at 50 nm x 100 nm and
the check runs every 5 slices (0.5 µm).

Depths measured on this specimen (world seed 0, cell 22, EM from its middle): confirmed after 5.5 µm (8 droplets agree,
the fewest that may confirm); the nearest neighbour flagged after 9.0 µm. The issue's goal is 3 µm, but the first
3 µm from this cell's middle hold only 6 droplets of any size.
"""

from __future__ import annotations

import numpy as np
import pytest

from clemflow.correlate.detect_lm import detect_lm_droplets
from clemflow.correlate.online import OnlineCorrelation, Verdict
from clemflow.protocol.analysis import Correlation
from clemflow.simulators.specimen import SpecimenParams, generate_world
from clemflow.simulators.specimen.clem_pair import apply, make_clem_pair

CONFIRMED_BY_UM = 6.5  # measured 5.5 µm; the goal of 3 µm is not met on this cell
FLAGGED_BY_UM = 11.0  # measured 9.0 µm


def droplet_rich_cell(world) -> int:
    """In the middle square, the cell with most droplets of 0.4 µm radius or more (the operator's pick)."""
    middle = world.square_of_cell(world.cells[len(world.cells) // 2])
    big = np.bincount(world.lipid_droplets.cell_id[world.lipid_droplets.radius_um >= 0.4], minlength=len(world.cells))
    return max((c.id for c in world.cells if world.square_of_cell(c) == middle), key=lambda i: big[i])


def nearest_cell(world, cell: int) -> int:
    centres = np.array([c.center_um for c in world.cells])
    distance = np.linalg.norm(centres - centres[cell], axis=1)
    distance[cell] = np.inf
    return int(np.argmin(distance))


def mill(pair, lm_droplets, go_on_um: float = 2.0) -> tuple[OnlineCorrelation, list[tuple[str, str]]]:
    """Feed the EM planes, in milling order, to a fresh check; returns it and what it announced.

    Feeding stops ``go_on_um`` past the first verdict (confirmed or not_this_cell): the operator knows then, and
    the updates after it show whether the verdict holds.
    """
    heard: list[tuple[str, str]] = []
    check = OnlineCorrelation(lm_droplets, Correlation(update_every=5),
                              announce=lambda message, level: heard.append((message, level)))
    dz, dy, _ = pair.em_voxel_um
    said_at = None
    for plane in pair.em:
        verdict = check.add(plane, pixel_um=dy, thickness_um=dz)
        if verdict is not None and verdict.state != "waiting" and said_at is None:
            said_at = verdict.depth_um
        if said_at is not None and check.depth_um >= said_at + go_on_um:
            break
    return check, heard


def first(history: list[Verdict], state: str) -> Verdict | None:
    return next((v for v in history if v.state == state), None)


def expected_announcements(history: list[Verdict]) -> list[tuple[str, str]]:
    """One announcement per change of verdict to confirmed (info) or not_this_cell (warning)."""
    out, before = [], None
    for v in history:
        if v.state != before and v.state != "waiting":
            out.append((v.message, "info" if v.state == "confirmed" else "warning"))
        before = v.state
    return out


@pytest.fixture(scope="module")
def world():
    return generate_world(SpecimenParams(hours_since_treatment=24.0), seed=0)


@pytest.fixture(scope="module")
def chosen(world):
    """The chosen cell's confocal stack and an EM run through it from its middle; the confocal droplets."""
    pair = make_clem_pair(world, droplet_rich_cell(world), em_fraction=(0.5, 1.0))
    return pair, detect_lm_droplets(pair.lm[1], pair.lm_voxel_um)


@pytest.fixture(scope="module")
def on_chosen(chosen):
    pair, lm = chosen
    return mill(pair, lm)


@pytest.fixture(scope="module")
def on_neighbour(world, chosen):
    pair, lm = chosen
    other = make_clem_pair(world, pair.cell_id, em_cell_id=nearest_cell(world, pair.cell_id), em_fraction=(0.5, 1.0))
    return other, mill(other, lm)


def test_run_on_the_chosen_cell_is_confirmed_early(chosen, on_chosen):
    pair, _ = chosen
    check, _ = on_chosen
    assert check.slices < len(pair.em)  # confirmed with room to spare in the volume
    confirmed = first(check.history, "confirmed")
    assert confirmed is not None, [(v.state, v.depth_um, v.em_droplets, v.agreeing) for v in check.history]
    assert confirmed.depth_um <= CONFIRMED_BY_UM, confirmed.message
    assert confirmed.tre_um is not None and confirmed.tre_um < 0.5
    assert confirmed.agreeing >= 8
    before = [v.state for v in check.history if v.slices < confirmed.slices]
    assert "not_this_cell" not in before
    # once confirmed it stays so as more of the cell is milled
    assert check.depth_um >= confirmed.depth_um + 2.0
    assert all(v.state == "confirmed" for v in check.history if v.slices >= confirmed.slices)


def test_online_transform_is_right_on_structures_it_never_saw(chosen, on_chosen):
    """Endolysosomes and particle clusters milled so far, through the check's latest transform.

    At 50 nm x 100 nm slices the check works unbinned, so its frame is the EM volume's own.
    """
    pair, _ = chosen
    check, _ = on_chosen
    last = check.last
    assert last is not None and last.state == "confirmed" and last.tre_um < 0.5
    errors = []
    for kind in ("endolysosomes", "clusters"):
        truth = pair.objects(kind)
        inside = pair.in_em(truth["em"]) & (truth["em"][:, 2] <= check.depth_um)
        assert inside.sum() >= 10
        errors.append(np.linalg.norm(apply(last.registration.matrix, truth["lm"][inside]) - truth["em"][inside], axis=1))
    assert np.median(np.concatenate(errors)) < 0.5


def test_run_on_a_neighbour_is_flagged_and_never_confirmed(on_neighbour):
    pair, (check, _) = on_neighbour
    assert pair.em_cell_id != pair.cell_id
    states = [v.state for v in check.history]
    assert "confirmed" not in states
    flagged = first(check.history, "not_this_cell")
    assert flagged is not None, [(v.state, v.depth_um, v.em_droplets, v.agreeing) for v in check.history]
    assert flagged.depth_um <= FLAGGED_BY_UM, flagged.message
    assert check.depth_um >= flagged.depth_um + 2.0  # milled on past the warning, and still not confirmed
    assert check.last.state == "not_this_cell"
    assert "not be on the cell chosen" in flagged.message


def test_each_change_of_verdict_is_announced_once(on_chosen, on_neighbour):
    _, (neighbour, heard_neighbour) = on_neighbour
    chosen, heard_chosen = on_chosen
    assert heard_chosen == expected_announcements(chosen.history)
    assert [level for _, level in heard_chosen] == ["info"]
    assert heard_neighbour == expected_announcements(neighbour.history)
    assert [level for _, level in heard_neighbour] == ["warning"]
