"""The parity study's fit: where a ratio curve first reaches 1.01x, with its bracket and the confident
(95% CI) point, and what is said when it never does."""
import math

import pytest

from bench.parity_report import crossing, describe, fits


def test_the_crossing_is_interpolated_between_the_points_that_bracket_it():
    # log-linear between (0.025, 1.05) and (0.05, 1.00): log(1.05/1.01) / log(1.05/1.00) of the way
    curve = [(0.0, 2.0, 2.2), (0.025, 1.05, 1.07), (0.05, 1.0, 1.02), (0.10, 0.99, 1.005)]
    fit = crossing(curve)
    share = 0.025 + 0.025 * math.log(1.05 / 1.01) / math.log(1.05)
    assert fit["reached"] and fit["first_point"] == 0.05 and fit["bracket"] == [0.025, 0.05]
    assert fit["interpolated"] == pytest.approx(share)
    assert fit["confident_share"] == 0.10  # the first point whose whole interval is under 1.01
    assert describe(fit) == f"{100 * share:.3g}% (2.5%-5%, CI by 10%)"


def test_a_curve_that_never_gets_there_says_its_best():
    fit = crossing([(0.0, 3.0, 3.1), (0.05, 1.2, 1.25), (0.15, 1.1, 1.12)])
    assert not fit["reached"] and fit["best_ratio"] == 1.1 and fit["at_share"] == 0.15
    assert describe(fit) == "never (best x1.100 at 15%)"


def test_a_curve_at_parity_from_the_start_needs_no_compute():
    fit = crossing([(0.0, 1.0, 1.0), (0.05, 1.02, 1.03)])
    assert fit["reached"] and fit["interpolated"] == 0.0 and fit["bracket"] == [0.0, 0.0]


def point(share, ppl, vs_source, vs_control):
    return {"share_of_pretraining_flops": share, "texts": {
        text: {"ppl": ppl, "vs_source": {"ratio": vs_source, "ci_high": vs_source},
               "vs_control": {"ratio": vs_control, "ci_high": vs_control}} for text in ("code", "wikitext")}}


def test_fits_judge_every_arm_against_source_control_and_its_from_scratch_twin():
    results = {"shapes": {"mha": {
        "arms": {"control": {"layout": None, "points": [point(0.0, 10.0, 1.0, 1.0), point(0.1, 9.0, 0.9, 0.9)]},
                 "fusedkv-copy": {"layout": "fusedkv", "points": [point(0.0, 30.0, 3.0, 3.0), point(0.1, 10.0, 1.0, 1.11)]}},
        "scratch": {"fusedkv": {"texts": {"code": {"ppl": 10.5}, "wikitext": {"ppl": 9.0}}}}}}}
    fitted = fits(results)["mha"]
    assert set(fitted["control"]["code"]) == {"vs_source"}  # a control is not judged against itself
    arm = fitted["fusedkv-copy"]["code"]
    assert arm["vs_source"]["reached"] and not arm["vs_control"]["reached"]
    assert arm["vs_scratch"]["reached"] and arm["vs_scratch"]["ratio_there"] == pytest.approx(10 / 10.5)
    assert not fitted["fusedkv-copy"]["wikitext"]["vs_scratch"]["reached"]  # 10 against the twin's 9
