"""Click options shared by several commands (not a command itself: ``cli`` skips it).

Each name is a decorator adding its option(s) at that place of the command's option list.
"""
import click


def _options(*decorators):
    def apply(f):
        for d in reversed(decorators):  # click lists options in decorator order, top first
            f = d(f)
        return f
    return apply


#: ``--lang-dir`` and ``--cuts`` (parameter ``cuts_path``) of the decoding commands.
decode_input_options = _options(
    click.option("--lang-dir", required=True, type=click.Path(file_okay=False),
                 help="Lang dir (words.txt, HLG.pt)."),
    click.option("--cuts", "cuts_path", required=True, type=click.Path(dir_okay=False),
                 help="CutSet with features to decode (e.g. cuts_dev.jsonl.gz)."),
)

#: The lattice search beams and the batch size of :class:`k2quant.decode.run.DecodeOptions`.
beam_options = _options(
    click.option("--search-beam", default=20.0, show_default=True, type=float),
    click.option("--output-beam", default=8.0, show_default=True, type=float),
    click.option("--min-active-states", default=30, show_default=True, type=int),
    click.option("--max-active-states", default=10000, show_default=True, type=int),
    click.option("--max-duration", default=300.0, show_default=True, type=float,
                 help="Seconds of audio per batch."),
)

#: ``--num-threads`` (torch intra-op threads).
num_threads_option = click.option("--num-threads", default=0, show_default=True, type=int,
                                  help="torch intra-op threads (0: torch's default).")
