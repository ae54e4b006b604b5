"""`kapao app`: the Gradio web demo (needs the `kapao[app]` extra)."""

from __future__ import annotations

import argparse

from kapao.cli.predict import add_backend_args


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("app", help="web demo: upload an image or a short video and see the poses (needs kapao[app])")
    p.add_argument("--weights", default=None, help="weights file or registry name; default: the shipped model")
    p.add_argument("--data", default=None,
                   help="data YAML whose keypoint schema the weights use (custom keypoint sets)")
    add_backend_args(p)
    p.add_argument("--host", default="127.0.0.1", help="address to serve on (0.0.0.0: every interface)")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--share", default="no", choices=["no", "yes"], help="yes: also a public gradio.live link")


def run(args: argparse.Namespace) -> int:
    from kapao.app import import_gradio, launch_app
    from kapao.engine.predictor import KAPAO

    import_gradio()  # fail with the install hint before loading any weights
    model = KAPAO(args.weights, device=args.device, half=args.half, data=args.data, backend=args.backend,
                  precision=args.precision, threads=args.threads, calib=args.calib)
    launch_app(model, host=args.host, port=args.port, share=args.share == "yes", block=True)
    return 0
