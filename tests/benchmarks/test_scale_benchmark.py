from benchmarks.scale import one, tiled_digits


def test_tiled_digits_exceed_the_data_set_deterministically():
    x, y = tiled_digits(2000, seed=1)
    again, _ = tiled_digits(2000, seed=1)
    assert x.shape == (2000, 64) and y.shape == (2000,)
    assert bool((x == again).all()) and int(y[1797]) == int(y[0])


def test_one_configuration_runs_small():
    result = one("trak", "sjlt", 40)
    assert result["finite"] and result["shape"] == [40, 200]
