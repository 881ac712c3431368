"""Runner profiles expand to Beam flags; flags given explicitly win."""
import logging

import pytest

from pipelines.profiles import PROFILES, expand


def test_default_profile_is_the_in_process_direct_runner():
    assert expand(None, []) == ["--runner=DirectRunner", "--direct_running_mode=in_memory"]


def test_explicit_flags_replace_the_profiles():
    args = expand("local", ["--direct_num_workers=7", "--temp_location=/tmp/x"])
    assert "--direct_num_workers=7" in args and not any(a.startswith("--direct_num_workers=") and a != "--direct_num_workers=7" for a in args)
    assert "--runner=DirectRunner" in args and "--temp_location=/tmp/x" in args


def test_dataflow_needs_project_region_and_temp_location():
    with pytest.raises(ValueError, match="--project"):
        expand("dataflow", [])
    args = expand("dataflow-gpu", ["--project=p", "--region=r", "--temp_location=gs://b/t"])
    assert any("worker_accelerator=type:nvidia-l4" in a for a in args)


def test_unknown_profile_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown profile"):
        expand("dask", [])
    assert {"direct", "local", "portable", "spark", "flink", "dataflow"} <= set(PROFILES)


@pytest.mark.parametrize("flags", [[], ["--runner=DirectRunner"],
                                   ["--direct_running_mode=multi_processing", "--direct_num_workers=2"]])
def test_the_direct_runner_never_tries_prism(flags, caplog):
    # Beam's DirectRunner tries the Prism runner first (downloading it from GitHub); popcast's jobs run the
    # DirectRunner's own engine, whatever the direct flags, and the result is still computed.
    import apache_beam as beam
    from apache_beam.testing.util import assert_that, equal_to

    from pipelines.job import run_beam

    def build(pipeline):
        counted = pipeline | beam.Create(["a", "b", "a"]) | beam.combiners.Count.PerElement()
        assert_that(counted, equal_to([("a", 2), ("b", 1)]))

    with caplog.at_level(logging.DEBUG):
        run_beam(build, "direct" if not flags else None, flags)
    assert not [r for r in caplog.records if "prism" in r.getMessage().lower()]
