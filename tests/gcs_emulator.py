"""Runs `gcp-storage-emulator` with object downloads that carry their generation and with generation
preconditions on writes and deletes, as real GCS has them.

The emulator's media downloads lack the `x-goog-generation` header. tensorstore (Orbax's array writer) reads an
object's generation from that header and makes its next write of that object conditional on it, so without it the
second commit of an OCDBT manifest fails with "Malformed StorageGeneration". The emulator also ignores
`ifGenerationMatch` (0: the object must not exist; N: its generation must be N): here an upload or a delete whose
precondition fails is answered 412 Precondition Failed, which kdjax's work-folder lease (kdjax.infra.lease) relies on.
The server answers one request at a time, so the check and the write are one step. Usage: as
`gcp-storage-emulator`.
"""

import sys
from http import HTTPStatus

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




def _precondition_failed(request, response, storage, object_id) -> bool:
  """Answers 412 (and says so) where the request's `ifGenerationMatch` does not hold for the object."""
  wanted = request.query.get("ifGenerationMatch")
  if not wanted or object_id is None:
    return False
  try:
    current = str(storage.get_file_obj(request.params["bucket_name"], object_id)["generation"])
  except NotFound:
    current = "0"
  if current == str(wanted[0]):
    return False
  response.status = HTTPStatus.PRECONDITION_FAILED
  response.json({"error": {"code": 412, "message": "At least one of the pre-conditions you specified did not hold.",
                           "errors": [{"reason": "conditionNotMet", "message": "Precondition Failed"}]}})
  return True


def _upload_name(request):
  if request.query.get("name"):
    return request.query["name"][0]
  data = request.data if isinstance(request.data, dict) else {}
  return (data.get("meta") or {}).get("name") or data.get("name")


_insert, _delete = objects.insert, objects.delete


def insert_with_precondition(request, response, storage, *args, **kwargs):
  if _precondition_failed(request, response, storage, _upload_name(request)):
    return None
  return _insert(request, response, storage, *args, **kwargs)


def delete_with_precondition(request, response, storage, *args, **kwargs):
  if _precondition_failed(request, response, storage, request.params.get("object_id")):
    return None
  return _delete(request, response, storage, *args, **kwargs)


# Before the server module builds its route table.
objects.download = download_with_generation
objects.insert = insert_with_precondition
objects.delete = delete_with_precondition

from gcp_storage_emulator import __main__ as emulator_main  # noqa: E402

if __name__ == "__main__":
  emulator_main.main(sys.argv[1:])
