"""What went wrong in an inference, as the HTTP answer a client can act on.

Client errors (a bad upload, a missing support, a bad param) are 4xx with a message naming the
problem; a model that cannot serve now (no or bad weights, busy, GPU out of memory) is 503.
Anything else is a bug and stays a 500.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from fastapi import HTTPException

from lib.configs import ModelUnavailable
from lib.infers.support import SupportNotFound
from lib.server.concurrency import Busy
from sdfsmis.io.volume import VolumeError, VolumeTooLarge
from sdfsmis.io.weights import CheckpointError

logger = logging.getLogger(__name__)


class RequestError(ValueError):
    """A request param that cannot be used; the message says which and why."""


@contextmanager
def http_errors(method: str | None = None) -> Iterator[None]:
    """Turn what a request can fail on into an HTTP status with a message that says what was
    wrong, naming the ``method`` (the model of the request) when there is one."""
    model = f"{method} model" if method else "model"
    try:
        yield
    except ModelUnavailable as error:
        raise HTTPException(status_code=503, detail=f"{model} unavailable: {error}") from error
    except CheckpointError as error:
        raise HTTPException(status_code=503, detail=f"{model}: checkpoint unusable: {error}") from error
    except Busy as error:
        retry = {"Retry-After": str(error.retry_after_s)}
        raise HTTPException(status_code=503, detail=str(error), headers=retry) from error
    except torch.cuda.OutOfMemoryError:
        # the failed request's tensors are freed with its traceback; hand the cached blocks back too
        torch.cuda.empty_cache()
        logger.warning(f"{model}: GPU out of memory during inference")
        raise HTTPException(
            status_code=503,
            detail=f"{model}: the GPU ran out of memory for this request; retry, or segment fewer labels or a smaller "
            "volume (and keep max_concurrent_infers at 1)",
        ) from None
    except (SupportNotFound, RequestError) as error:
        raise HTTPException(status_code=400, detail=str(error)) from error
    except VolumeTooLarge as error:
        raise HTTPException(status_code=413, detail=str(error)) from error
    except VolumeError as error:
        raise HTTPException(status_code=422, detail=str(error)) from error


def parse_label_ids(value: object, names: dict[int, str]) -> list[int] | None:
    """Param ``labels``: ids or names of the support's ``label_info`` ("1,3" or "liver,3"); None = all."""
    wanted = []
    by_name = {name.lower(): idx for idx, name in names.items()}
    for item in (k.strip() for k in str(value or "").split(",")):
        if not item:
            continue
        if item.isdigit():
            wanted.append(int(item))
        elif item.lower() in by_name:
            wanted.append(by_name[item.lower()])
        else:
            known = ", ".join(f"{idx} {name}" for idx, name in sorted(names.items())) or "none named"
            raise RequestError(
                f"param 'labels': '{item}' is neither a label id nor a label name of the support: {known}"
            )
    return wanted or None
