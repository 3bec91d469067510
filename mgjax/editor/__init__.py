"""The browser motion editor: `python launch.py --serve` (docs/editor.md).

authoring  what the page gives (uploads, painted masks, motions, settings) as files and a
           Config, and the live target-flow preview, through launch.py's own code
runner     one edit (or one generated source) on models loaded once, samplers kept per setting
worker     the one worker thread: a FIFO queue, places, cancel, events per job
app        the Starlette application (HTTP + server-sent events) and `serve`
static/    the page: plain HTML, CSS and JavaScript, nothing fetched from elsewhere
"""
