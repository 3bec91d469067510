"""The editor under load on a real uvicorn on 127.0.0.1: clients upload, preview, list the
queue and follow events while a toy edit runs. No answer is a 5xx, no job is lost or run twice,
and the edit writes the same edited.png as when it runs alone."""

import json
import os

import numpy as np
import pytest
from PIL import Image

from bench import editor_load as L

pytestmark = pytest.mark.slow


def test_concurrent_clients_while_an_edit_runs(tmp_path):
    editor, app = L.toy_editor(str(tmp_path), {"chunk": 1})
    runs = []
    real_edit = editor.engine.edit

    def counted(config, job):
        runs.append(config.output.out_dir)
        return real_edit(config, job)

    editor.engine.edit = counted
    server = L.LocalServer(app)
    try:
        spec = L.demo_spec(server.base, 4)
        status, body, _ = L.call(server.base, "/api/run", spec)
        alone = json.loads(body)
        assert status == 200 and editor.worker.wait(editor.worker.jobs[alone["id"]], 600)

        clients = L.Clients(server.base, 4)
        ids = []
        for _ in range(2):
            status, body, _ = L.call(server.base, "/api/run", spec)
            assert status == 200, body
            ids.append(json.loads(body)["id"])
        follower = L.Clients(server.base, 2, follow=ids[-1])
        for i in ids:
            assert editor.worker.wait(editor.worker.jobs[i], 600)
        clients.stop()
        follower.stop()
    finally:
        editor.worker.close()
        server.stop()

    assert clients.server_errors() == [] and follower.server_errors() == []
    assert len(clients.times) > 10
    jobs = [editor.worker.jobs[i] for i in [alone["id"], *ids]]
    assert [j.status for j in jobs] == ["done"] * 3
    assert sorted(runs) == sorted(j.folder for j in jobs)  # each job ran once
    for job in jobs:
        steps = [e["done"] for e in job.events if e["type"] == "progress"]
        assert steps == [1, 2, 3, 4]

    def edited(job):
        return np.asarray(Image.open(os.path.join(job.folder, "sample_00", "edited.png")))

    for job in jobs[1:]:
        np.testing.assert_array_equal(edited(job), edited(jobs[0]))
