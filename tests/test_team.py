"""Team mode against the real servers of `sdpipe services` (one stack for the session, tests/conftest.py)."""

import os
import stat
import urllib.error
import urllib.request
from base64 import b64encode

import boto3
import pytest
from botocore.exceptions import ClientError

from pipeline import services
from pipeline.core import team

pytestmark = pytest.mark.team


def _status_code(url: str, login: str | None = None) -> int:
    headers = {"Authorization": "Basic " + b64encode(login.encode()).decode()} if login else {}
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=30) as reply:
            return reply.status
    except urllib.error.HTTPError as refused:
        return refused.code


def test_the_stack_runs_and_answers_only_its_logins(team_stack):
    settings = team.read_team_settings(team_stack.root)
    assert all(line.startswith("running") for line in services.status(team_stack.root, team_stack.state).values())

    experiments = settings[team.TRACKING_URI] + "/api/2.0/mlflow/experiments/search?max_results=1"
    login = f"{settings[team.TRACKING_USERNAME]}:{settings[team.TRACKING_PASSWORD]}"
    assert (_status_code(experiments), _status_code(experiments, "admin:wrong-password")) == (401, 401)
    assert _status_code(experiments, login) == 200

    version = settings[team.PREFECT_API_URL] + "/admin/version"
    assert (_status_code(version), _status_code(version, settings[team.PREFECT_AUTH])) == (401, 200)

    s3 = boto3.client("s3", endpoint_url=settings[team.DVC_ENDPOINT], region_name="us-east-1",
                      aws_access_key_id=settings[team.DVC_KEY_ID], aws_secret_access_key="wrong")
    with pytest.raises(ClientError):
        s3.list_objects_v2(Bucket=services.DVC_BUCKET)

    for private in (team.team_file(team_stack.root), team_stack.record_file):
        assert stat.S_IMODE(os.stat(private).st_mode) == 0o600, private
    # clients get their logins, never the database password
    assert team_stack.secret["postgres"] not in team.team_file(team_stack.root).read_text()
