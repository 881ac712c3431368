"""Named runner profiles that expand to Beam pipeline options; explicit Beam flags win over a profile."""
from __future__ import annotations

import os

PROFILES: dict[str, list[str]] = {
    # In-process FnApiRunner: named explicitly so the DirectRunner does not try to download Prism.
    "direct": ["--runner=DirectRunner", "--direct_running_mode=in_memory"],
    # Several local worker processes (one model copy per process).
    "local": ["--runner=DirectRunner", "--direct_running_mode=multi_processing",
              f"--direct_num_workers={max(2, os.cpu_count() or 2)}"],
    # Beam's portable job service on this machine, SDK workers in this process.
    "portable": ["--runner=PortableRunner", "--job_endpoint=localhost:8099", "--environment_type=LOOPBACK"],
    # Spark / Flink job servers started by the cluster scripts (see README "Runner profiles").
    "spark": ["--runner=PortableRunner", "--job_endpoint=localhost:8099", "--environment_type=LOOPBACK"],
    "flink": ["--runner=FlinkRunner", "--flink_master=[auto]", "--environment_type=LOOPBACK"],
    # Dataflow: project/region/temp_location come from the user's flags.
    "dataflow": ["--runner=DataflowRunner", "--setup_file=./setup.py", "--save_main_session"],
}


def _flag_name(arg: str) -> str:
    return arg.split("=", 1)[0].lstrip("-")


def expand(profile: str | None, beam_args: list[str]) -> list[str]:
    """Profile options followed by the user's Beam flags; a flag given by the user replaces the profile's."""
    if profile is None:
        profile = "direct"
    if profile not in PROFILES:
        raise ValueError(f"unknown profile {profile!r}; choose one of {', '.join(PROFILES)}")
    given = {_flag_name(a) for a in beam_args if a.startswith("--")}
    return [a for a in PROFILES[profile] if _flag_name(a) not in given] + list(beam_args)
