"""Charts: drawn by matplotlib, every series in a style of its own."""
from sae_core.plots import bar_chart, histogram_chart, line_chart, series_styles


def test_twelve_series_get_twelve_different_styles():
    styles = [tuple(sorted(style.items())) for style in series_styles(12)]
    assert len(set(styles)) == 12
    assert len({(s["color"], s["linestyle"]) for s in series_styles(12)}) == 12  # distinct even without markers


def test_charts_are_pictures_and_an_empty_chart_says_so():
    curves = {f"direction {i}": [(s, 0.1 * i + s) for s in (0.0, 0.5, 1.0)] for i in range(12)}
    chart = line_chart(curves, "flip rate", x_label="strength", y_label="flip rate")
    assert chart.mode == "RGB" and chart.width > 600
    empty = line_chart({"loss": [(1, 0.0)]}, "loss", log_y=True)  # nothing positive to draw on a log axis
    assert empty.getcolors(1 << 20) and empty.width > 300
    assert histogram_chart([0, 1, 2, 3], [5, 0, 2], "firing", "log10 frequency").height > 200
    assert bar_chart(["#3", "#7"], [2.0, 1.0], "top features").height > 100
