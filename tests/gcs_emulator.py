"""Runs `gcp-storage-emulator` with object downloads that carry their generation, as real GCS does.

The emulator's media downloads lack the `x-goog-generation` header. tensorstore (Orbax's array writer) reads an
object's generation from that header and makes its next write of that object conditional on it, so without it the
second commit of an OCDBT manifest fails with "Malformed StorageGeneration". Usage: as `gcp-storage-emulator`.
"""

import sys

from gcp_storage_emulator.exceptions import NotFound
from gcp_storage_emulator.handlers import objects

_download = objects.download


def download_with_generation(request, response, storage, *args, **kwargs):
  try:
    obj = storage.get_file_obj(request.params["bucket_name"], request.params["object_id"])
    response["x-goog-generation"] = str(obj["generation"])
    response["x-goog-metageneration"] = str(obj["metageneration"])
  except NotFound:
    pass  # the original handler answers 404
  return _download(request, response, storage, *args, **kwargs)


objects.download = download_with_generation  # before the server module builds its route table

from gcp_storage_emulator import __main__ as emulator_main  # noqa: E402

if __name__ == "__main__":
  emulator_main.main(sys.argv[1:])
