"""`ddlp studio`: the interactive what-if editor in the browser (a local web server)."""
from __future__ import annotations

LOCAL = ("127.0.0.1", "localhost", "::1")


def cmd_studio(args) -> int:
    import webbrowser

    from ..studio import Studio, balls_clips, folder_clips, make_server
    from ..whatif import burn_in, load_ddlp
    model = load_ddlp(args.checkpoint)
    args.cond_steps = burn_in(model) if args.cond_steps is None else args.cond_steps
    if args.cond_steps < 1 or not 1 <= args.horizon <= 500 or (args.balls or 0) < 0:
        raise ValueError("need --cond-steps >= 1, 1 <= --horizon <= 500 and --balls >= 0")
    size = model.config.image_size
    clips = folder_clips(args.clips, size) if args.clips else {}
    n_balls = args.balls if args.balls is not None else (0 if args.clips else 4)
    clips.update(balls_clips(n_balls, args.cond_steps + 4, size))
    if not clips:
        raise ValueError(f"no clips: {args.clips} holds no video, frame folder or .npy/.npz/.h5/.hdf5 array, and --balls is 0")
    studio = Studio(model, clips, cond_steps=args.cond_steps, horizon=args.horizon, name=str(args.checkpoint))
    server = make_server(studio, args.host, args.port, quiet=not args.verbose)
    host, port = server.server_address[:2]
    url = f"http://{'[' + host + ']' if ':' in host else host}:{port}/"
    if args.host not in LOCAL:
        print(f"warning: listening on {args.host}: anyone who can reach this machine can use the studio")
    print(f"ddlp studio: {len(clips)} clip(s), model {args.checkpoint}; open {url}  (Ctrl-C to stop)", flush=True)
    if args.open:
        webbrowser.open(url)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        print("stopped")
    finally:
        server.server_close()
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser("studio", help="interactive what-if editor in the browser",
                       description="Serve a local web page to edit a DDLP model's particles: pick particles "
                       "(click, box-select), drag them, change scale / transparency / appearance, press Play "
                       "and compare the original and edited rollouts. Works offline; binds to 127.0.0.1.")
    p.add_argument("checkpoint", help="DDLP model directory (config.json + model.safetensors) or a "
                   "training run folder")
    p.add_argument("--clips", metavar="DIR", help="folder of example clips: video files, sub-folders of "
                   "frames, and .npy/.npz/.h5/.hdf5 arrays (their first 8 episodes)")
    p.add_argument("--balls", type=int, metavar="N", help="also offer N generated Balls-Interaction "
                   "episodes (default 4 without --clips, else 0)")
    p.add_argument("--cond-steps", type=int, help="conditioning frames (default: the model's burn-in, "
                   "num_static_frames: 4 in the paper's configs)")
    p.add_argument("--horizon", type=int, default=40, help="default number of predicted frames (default 40)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8765, help="port (default 8765; 0 picks a free one)")
    p.add_argument("--open", action="store_true", help="open the page in the default browser")
    p.add_argument("--verbose", action="store_true", help="log every request")
    p.set_defaults(fn=cmd_studio)
