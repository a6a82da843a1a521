"""The only modules that touch third-party internals: LitServe's and FastAPI's (``service.seam.litserve``)
and uvicorn's HTTP protocol (``service.seam.uvicorn``). Each pins the version it was checked against,
and ``tests/unit/test_seam.py`` checks every overridden signature and private name it relies on."""
