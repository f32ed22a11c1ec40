"""The harness itself: a real registry starts, takes a push, serves it back complete."""

from tests.harness.images import Pusher, assert_image_complete, layer_bytes


def test_registry_roundtrip(registry):
    with Pusher(registry.url) as p:
        img = p.push_image("team/app", "v1", [layer_bytes("base", 4096), layer_bytes("x", 100)])
        idx = p.push_multiarch("team/multi", "latest", "m")
    assert assert_image_complete(registry.url, "team/app", "v1") == img.digest
    assert assert_image_complete(registry.url, "team/multi", "latest") == idx.digest
    assert registry.has_blob_data(img.blobs[1])
