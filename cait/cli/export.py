"""``cait export``: write a saved model for deployment (ExportedProgram, ONNX or AOTInductor) and check it."""

from __future__ import annotations

import argparse


def add_parser(commands) -> None:
    e = commands.add_parser(
        "export",
        help="write a saved model as an ExportedProgram (.pt2), ONNX (.onnx) or AOTInductor package (.aoti.pt2)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Export a .safetensors model written by cait for deployment, then load the written file as a deployment "
        "would and check that it reproduces the model on random images (else nothing is written). Formats:\n"
        "  pt2   torch.export ExportedProgram: torch.export.load(FILE) in a process that imported cait_kernels\n"
        "  onnx  standard ONNX operators only (opset 18), checked in onnxruntime; needs pip install 'cait[export]'\n"
        "  aoti  AOTInductor package (compiled ahead of time, CPU, one input shape): cait.load_exported(FILE), which refuses "
        "other shapes\n"
        "torch.jit.trace and torch.jit.script are not supported: this command replaces them.",
    )
    e.add_argument("file", help="a .safetensors file written by cait (cait compress, cait finetune, cait.save)")
    e.add_argument("--format", required=True, choices=("pt2", "onnx", "aoti"), help="what to write (see above)")
    e.add_argument("--batch", type=int, default=1, metavar="N", help="batch size the file is traced for (default: 1)")
    e.add_argument(
        "--dynamic-batch", action="store_true", help="the file takes any batch size >= 1 (pt2 and onnx; checked at N and N+1)"
    )
    e.add_argument(
        "--img-size",
        type=int,
        nargs="+",
        metavar="PX",
        help="image size the file takes: H, or H W (default: the model's; another size needs a model saved with dynamic_img_size)",
    )
    e.add_argument(
        "--out", metavar="PATH", help="where to write (default: FILE with the suffix .pt2, .onnx or .aoti.pt2; the suffix names the format)"
    )
    e.set_defaults(run=run)


def run(args) -> None:
    import cait
    from cait.exported import default_path

    if args.img_size is not None and len(args.img_size) > 2:
        raise ValueError(f"--img-size takes H or H W, got {len(args.img_size)} numbers")
    model = cait.load(args.file).eval()
    out = args.out or default_path(args.file, args.format)
    size = None if args.img_size is None else tuple(args.img_size) if len(args.img_size) == 2 else args.img_size[0]
    done = cait.export(model, out, format=args.format, batch=args.batch, dynamic_batch=args.dynamic_batch, img_size=size)
    shape = "any batch" if done.dynamic_batch else f"batch {done.batch}"
    height, width = done.img_size
    print(
        f"wrote {done.path} ({done.format}, {shape}, {height}x{width} px; {done.seconds:.1f} s; "
        f"checked against the model: relative error {done.error:.1e})"
    )
