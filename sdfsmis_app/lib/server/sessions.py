"""MONAI Label's sessions with ids that cannot name a path, and archives that cannot write outside.

``Sessions`` joins the session id given in a request (``/session/{id}``, ``/infer?session_id=``)
to its store folder, and removes that folder when the session looks dangling: an id such as
``..`` reaches outside the store. Ids are checked as the datastore checks image ids.

``PUT /session/?uncompress=true`` unpacks the uploaded archive with ``shutil.unpack_archive``,
which on Python < 3.14 extracts a tar member named ``../../x`` (or a link pointing outside)
wherever it points. Here an archive with a member that would land outside the unpack folder is
refused whole (400), a tar with Python's ``data`` extraction filter, a zip by its member names.
"""

from __future__ import annotations

import os
import shutil
import tarfile
import tempfile
import zipfile
from pathlib import PurePosixPath

from fastapi import HTTPException
from monailabel.utils.sessions import Sessions

from lib.server.datastore import check_name


class SafeSessions(Sessions):
    def get_session(self, session_id: str, update_ts: bool = True, fetch_cache: bool = True):
        return super().get_session(check_name(session_id, "session id"), update_ts, fetch_cache)

    def remove_session(self, session_id: str):
        return super().remove_session(check_name(session_id, "session id"))

    def add_session(self, data_file: str, expiry: int = 0, uncompress: bool = False, session_id=None):
        if session_id:
            check_name(session_id, "session id")
        if uncompress and not os.path.isdir(data_file):
            data_file, uncompress = unpack(data_file), False  # a folder is stored as MONAI Label stores one
        return super().add_session(data_file, expiry, uncompress, session_id)


def _refused(archive: str, why: str) -> HTTPException:
    return HTTPException(status_code=400, detail=f"session archive {os.path.basename(archive)} refused: {why}")


def unpack(archive: str) -> str:
    """A new folder holding the archive's files; a 400 naming the member if one would land outside it."""
    folder = tempfile.mkdtemp()
    try:
        if zipfile.is_zipfile(archive):
            with zipfile.ZipFile(archive) as members:
                for name in members.namelist():
                    if name.startswith("/") or ".." in PurePosixPath(name.replace("\\", "/")).parts:
                        raise _refused(archive, f"member {name!r} would be written outside the session folder")
                members.extractall(folder)
        elif tarfile.is_tarfile(archive):
            with tarfile.open(archive) as members:
                try:
                    members.extractall(folder, filter="data")
                except tarfile.FilterError as error:
                    raise _refused(archive, f"{error} (members must stay inside the session folder)") from error
        else:
            raise _refused(archive, "uncompress=true but the upload is not a zip or tar archive")
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise
    return folder
