"""MONAI Label's sessions with ids that cannot name a path.

``Sessions`` joins the session id given in a request (``/session/{id}``, ``/infer?session_id=``)
to its store folder, and removes that folder when the session looks dangling: an id such as
``..`` reaches outside the store. Ids are checked as the datastore checks image ids.
"""

from __future__ import annotations

from monailabel.utils.sessions import Sessions

from .datastore import check_name


class SafeSessions(Sessions):
    def get_session(self, session_id: str, update_ts: bool = True, fetch_cache: bool = True):
        return super().get_session(check_name(session_id, "session id"), update_ts, fetch_cache)

    def remove_session(self, session_id: str):
        return super().remove_session(check_name(session_id, "session id"))

    def add_session(self, data_file: str, expiry: int = 0, uncompress: bool = False, session_id=None):
        if session_id:
            check_name(session_id, "session id")
        return super().add_session(data_file, expiry, uncompress, session_id)
