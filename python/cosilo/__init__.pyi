from ._cosilo import (
    CosiloError as CosiloError,
    Declaration as Declaration,
    Observer as Observer,
    Segmenter as Segmenter,
    __version__ as __version__,
    hold_session as hold_session,
    read_nifti as read_nifti,
    write_nifti as write_nifti,
)
from .federation import Federation as Federation, declare as declare, find_cosilo as find_cosilo
