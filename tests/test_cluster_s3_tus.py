"""tus uploads in a shared-nothing cluster (issue 29): one S3 multipart upload per tus upload, its
PATCHes landing on any node. One PATCH of an upload writes at a time cluster-wide (423 with
Retry-After elsewhere); a node killed mid-PATCH holds the upload until its claim lapses; the
finished upload becomes a job with exactly its bytes; termination and expiry abort the multipart
upload, and nothing is left in the store once the job is delivered."""

from __future__ import annotations

import socket

import pytest

from conftest import TOKEN, wait_until
from harness import long_tone
from test_cluster_s3 import s3_cluster  # noqa: F401  (the fixture)
from whisperd.resumable import CLAIM_SECONDS
from whisperd.store.s3_tus import PART_BYTES

TUS = {"Tus-Resumable": "1.0.0"}
OCTETS = "application/offset+octet-stream"
MiB = 2**20


@pytest.fixture
def nodes(s3_cluster):  # noqa: F811
    """Three nodes that each take any request; .uploads: the prefix of the tus uploads' objects."""
    three = [s3_cluster(f"node{i}", "all") for i in range(3)]
    three[0].uploads = s3_cluster.prefix[:-len("jobs/")] + "uploads/"
    three[0].store = s3_cluster.store
    return three


def create(node, size: int) -> str:
    response = node.api("POST", "/uploads", headers={**TUS, "Upload-Length": str(size)})
    assert response.status_code == 201, response.text
    return response.headers["Location"]


def patch(node, location: str, offset: int, data: bytes):
    return node.api("PATCH", location, data=data, headers={**TUS, "Upload-Offset": str(offset), "Content-Type": OCTETS})


def offset_of(node, location: str) -> int:
    response = node.api("HEAD", location, headers=dict(TUS))
    assert response.status_code == 200, response.status_code
    return int(response.headers["Upload-Offset"])


class HeldPatch:
    """A PATCH that sends part of its body and waits: the upload is claimed by its node meanwhile."""

    def __init__(self, node, location: str, offset: int, body: bytes, first: int) -> None:
        self.body, self.first = body, first
        head = [f"PATCH {location} HTTP/1.1", f"Host: 127.0.0.1:{node.port}", f"Authorization: Bearer {TOKEN}",
                "Tus-Resumable: 1.0.0", f"Upload-Offset: {offset}", f"Content-Type: {OCTETS}",
                f"Content-Length: {len(body)}"]
        self.sock = socket.create_connection(("127.0.0.1", node.port))
        self.sock.sendall(("\r\n".join(head) + "\r\n\r\n").encode() + body[:first])

    def finish(self) -> str:
        self.sock.sendall(self.body[self.first:])
        self.sock.settimeout(60)
        answer = self.sock.recv(4096).decode("latin-1")
        self.sock.close()
        return answer.split("\r\n", 1)[0]


def claimed(node, location: str) -> bool:
    rows = node.rows("SELECT patch_claim FROM uploads WHERE id=?", (location.rsplit("/", 1)[1],))
    return bool(rows and rows[0]["patch_claim"])


def test_patches_on_any_node_make_one_multipart_upload_and_a_job_of_exactly_those_bytes(nodes):
    data = long_tone(nodes[0].root / "long.wav", 660)  # 20.1 MiB: two whole parts and a tail
    assert 2 * PART_BYTES < len(data) < 3 * PART_BYTES
    location = create(nodes[0], len(data))
    cuts = [0, 3 * MiB, 12 * MiB, 12 * MiB + 100_000, len(data)]
    store = nodes[0].store
    for step, (start, end) in enumerate(zip(cuts, cuts[1:])):
        node = nodes[step % 3]
        if step == 1:
            # Held half-way on node1: the upload is claimed cluster-wide; node2 is told to wait.
            held = HeldPatch(node, location, start, data[start:end], (end - start) // 2)
            wait_until(lambda: claimed(node, location), 10, "node1's PATCH to claim the upload")
            refused = patch(nodes[2], location, start, data[start:end])
            assert refused.status_code == 423, refused.text
            assert 1 <= int(refused.headers["Retry-After"]) <= CLAIM_SECONDS
            assert "another PATCH" in refused.json()["error"]
            assert held.finish() == "HTTP/1.1 204 No Content"
        else:
            answer = patch(node, location, start, data[start:end])
            assert answer.status_code == 204, answer.text
        assert offset_of(nodes[(step + 1) % 3], location) == end
        if step == 0:
            assert store.multipart_uploads(nodes[0].uploads) == []  # under one part: the tail object only
    (multipart,) = store.multipart_uploads(nodes[0].uploads)
    assert multipart["Key"].endswith("/data")
    parts = store.client().list_parts(Bucket="whisperd-test", Key=multipart["Key"], UploadId=multipart["UploadId"])
    assert [part["Size"] for part in parts["Parts"]] == [PART_BYTES, PART_BYTES]
    tails = [key for key in store.keys(nodes[0].uploads) if "/tail-" in key]
    assert len(tails) == 1, tails  # each PATCH's tail replaced the one before

    use = nodes[2].api("POST", "/transcription", files={"upload": (None, location.rsplit("/", 1)[1])})
    assert use.status_code == 202, use.text
    job_id = use.json()["job_id"]
    assert nodes[1].wait_status(job_id, timeout=120)["status"] == "Completed"
    assert nodes[1].job_audio(job_id) == data
    assert nodes[0].api("GET", f"/transcription/{job_id}/result").status_code == 200
    wait_until(lambda: not store.keys(nodes[0].uploads) and not store.multipart_uploads(nodes[0].uploads), 15,
               "the upload's objects to go once its job was accepted")
    assert all(node.files_gone() for node in nodes), [node.job_files() for node in nodes]


def test_a_node_killed_mid_patch_holds_the_upload_until_its_claim_lapses(nodes):
    data = long_tone(nodes[0].root / "long.wav", 300)  # 9.2 MiB
    location = create(nodes[0], len(data))
    assert patch(nodes[1], location, 0, data[:PART_BYTES + 1000]).status_code == 204
    held = HeldPatch(nodes[0], location, PART_BYTES + 1000, data[PART_BYTES + 1000:], 5000)
    wait_until(lambda: claimed(nodes[0], location), 10, "node0's PATCH to claim the upload")
    nodes[0].kill9()
    held.sock.close()
    refused = patch(nodes[2], location, PART_BYTES + 1000, data[PART_BYTES + 1000:])
    assert refused.status_code == 423 and int(refused.headers["Retry-After"]) >= 1
    for node in nodes[1:]:  # time passes for the living: the dead node's claim lapses
        node.pass_time(CLAIM_SECONDS + 1)
    assert offset_of(nodes[2], location) == PART_BYTES + 1000  # what the killed PATCH got never counted
    assert patch(nodes[2], location, PART_BYTES + 1000, data[PART_BYTES + 1000:]).status_code == 204
    job_id = nodes[1].api("POST", "/transcription", files={"upload": (None, location.rsplit("/", 1)[1])}).json()["job_id"]
    assert nodes[1].wait_status(job_id, timeout=120)["status"] == "Completed"
    assert nodes[1].job_audio(job_id) == data


def test_termination_and_expiry_abort_the_multipart_upload(s3_cluster):  # noqa: F811
    # 7.2 s to live, retention every 0.36 s on the second node.
    one = s3_cluster("node0", "all", WHISPER_UPLOAD_EXPIRY_HOURS="0.002")
    two = s3_cluster("node1", "all", WHISPER_UPLOAD_EXPIRY_HOURS="0.002", WHISPER_CLEANUP_INTERVAL_HOURS="0.0001")
    uploads = s3_cluster.prefix[:-len("jobs/")] + "uploads/"
    store = s3_cluster.store
    data = b"\x01" * (PART_BYTES + 5)
    ended = create(one, 2 * PART_BYTES)
    assert patch(one, ended, 0, data).status_code == 204
    assert len(store.multipart_uploads(uploads)) == 1 and store.keys(uploads)
    assert two.api("DELETE", ended, headers=dict(TUS)).status_code == 204
    wait_until(lambda: not store.multipart_uploads(uploads) and not store.keys(uploads), 10,
               "the terminated upload's parts and tail to go")

    abandoned = create(two, 2 * PART_BYTES)  # its Upload-Expires is 7.2 s away
    assert patch(one, abandoned, 0, data).status_code == 204
    wait_until(lambda: not two.rows("SELECT id FROM uploads"), 15, "retention to expire the abandoned upload", poll=0.2)
    wait_until(lambda: not store.multipart_uploads(uploads) and not store.keys(uploads), 10,
               "the expired upload's parts and tail to go")
    assert patch(one, abandoned, PART_BYTES + 5, b"x").status_code in (404, 410)


def test_a_patch_that_lost_its_claim_counts_for_nothing_and_overwrites_nothing(nodes):
    """A PATCH stalled past its claim (here: the other node's clock moved on) finishes after
    another PATCH from the same offset counted: its parts, under numbers of their own, and its
    tail never make it into the upload, which is exactly the bytes that counted."""
    data = long_tone(nodes[0].root / "long.wav", 660)  # 20.1 MiB
    at = PART_BYTES + 10  # a whole part counted already: both PATCHes below add to one multipart upload
    impostor = bytes(range(256)) * ((len(data) - at) // 256 + 1)
    location = create(nodes[0], len(data))
    assert patch(nodes[2], location, 0, data[:at]).status_code == 204
    stale = HeldPatch(nodes[0], location, at, impostor[:len(data) - at], 1000)
    wait_until(lambda: claimed(nodes[0], location), 10, "node0's PATCH to claim the upload")
    nodes[1].pass_time(CLAIM_SECONDS + 1)  # for node1, node0's claim has lapsed
    assert patch(nodes[1], location, at, data[at:]).status_code == 204
    assert stale.finish() == "HTTP/1.1 409 Conflict"  # its offset moved meanwhile: nothing of it counts
    store = nodes[0].store
    assert len([key for key in store.keys(nodes[0].uploads) if "/tail-" in key]) == 1  # its tail went
    (multipart,) = store.multipart_uploads(nodes[0].uploads)
    numbers = [part["PartNumber"] for part in store.client().list_parts(
        Bucket="whisperd-test", Key=multipart["Key"], UploadId=multipart["UploadId"])["Parts"]]
    assert numbers == [1, 2, 3], numbers  # its part went in under a number of its own (3), never listed
    job_id = nodes[2].api("POST", "/transcription", files={"upload": (None, location.rsplit("/", 1)[1])}).json()["job_id"]
    assert nodes[2].wait_status(job_id, timeout=120)["status"] == "Completed"
    assert nodes[2].job_audio(job_id) == data
