"""One edit, from a Config to the files it writes.

checks      the configuration checked before anything is loaded or written
readers     what a user gives (masks, flows, schedules, images), checked against its size
reference   the authors' example data folders, read without torch
motion      target flows from described motions, object masks, the automatic frozen mask
drag        drag points to a dense target flow
trajectory  the edit's source image, z_T and DDIM trajectory, cached in the run folder
workflow    a single edit: inputs -> source -> guided sampling -> outputs
results     each sample's pictures, metrics and configuration
outputs     images, panel, toggle GIF and loss curves, written atomically
rundir      the folders mgjax writes, recognised by a marker file
checkpoint  checkpoint files of a guided run
progress    sampling progress on a terminal or in a log
"""
