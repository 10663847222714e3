from cycleqd.recent import Recent


def test_recent_keeps_the_last_written_entries():
    r = Recent(3)
    for k in "abcd":
        r[k] = k.upper()
    assert list(r) == ["b", "c", "d"]
    r["b"] = "B2"  # writing again makes it the newest
    r["e"] = "E"
    assert list(r.items()) == [("d", "D"), ("b", "B2"), ("e", "E")]
    assert r.get("c") is None and r["d"] == "D"  # reading does not reorder
    off = Recent(0)
    off["x"] = 1
    assert not off
