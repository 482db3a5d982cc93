"""Restore-point metadata (appliance/jobs/point_metadata.py): one typed structure the backup
writes and every restore path reads."""

from __future__ import annotations

from appliance.jobs.point_metadata import METADATA_VERSION, PointMetadata

WRITERS = {"writers": [
    {"name": "filesystem", "kind": "filesystem",
     "components": [{"mount_point": "/"}, {"mount_point": "/data"}]},
    {"name": "postgresql:/run/postgresql", "kind": "postgresql",
     "files": ["/var/lib/postgresql/15/main"], "components": [{"port": 5432}]},
    {"name": "mariadb:/elsewhere", "kind": "mariadb", "files": ["/mnt/other/mysql"]},
]}


def test_round_trip_keeps_what_it_does_not_know() -> None:
    doc = {"job_id": "j1", "guest_id": "debian12_64Guest", "writer_metadata": WRITERS,
           "writer_results": {"postgresql:/run/postgresql": {"kind": "postgresql"}},
           "from_a_newer_version": {"x": 1}}
    meta = PointMetadata.from_dict(doc)
    assert meta.version == METADATA_VERSION and meta.job_id == "j1"
    assert meta.extra == {"from_a_newer_version": {"x": 1}}
    again = meta.to_dict()
    assert again["from_a_newer_version"] == {"x": 1} and again["version"] == 1
    assert PointMetadata.from_dict(again) == meta


def test_a_point_without_agent_and_an_old_point_without_version() -> None:
    crash = PointMetadata.from_dict({"job_id": "j2", "writer_metadata": None,
                                     "writer_results": None, "vm_config": None})
    assert not crash.agent_in_image and crash.writer_docs() == {} and crash.vm_config == {}
    assert crash.restorable_writers() == {} and crash.frozen_mount_points() == set()
    assert PointMetadata.from_dict({"guest_id": "windows2019srv_64Guest"}).is_windows


def test_restorable_writers_are_those_whose_files_are_in_the_image() -> None:
    meta = PointMetadata.from_dict({"writer_metadata": WRITERS, "writer_results": {
        "postgresql:/run/postgresql": {"kind": "postgresql", "os_user": "postgres"},
        "mariadb:/elsewhere": {"kind": "mariadb"}, "broken": "not a dict", "nokind": {}}})
    assert meta.frozen_mount_points() == {"/", "/data"}
    # The root was frozen: every writer's files are inside the image.
    assert sorted(meta.restorable_writers()) == ["mariadb:/elsewhere",
                                                 "postgresql:/run/postgresql"]
    assert meta.first_component("postgresql:/run/postgresql") == {"port": 5432}
    data_only = {"writers": [dict(WRITERS["writers"][0], components=[{"mount_point": "/var"}]),
                             *WRITERS["writers"][1:]]}
    meta = PointMetadata.from_dict({"writer_metadata": data_only,
                                    "writer_results": meta.writer_results})
    assert sorted(meta.restorable_writers()) == ["postgresql:/run/postgresql"]
