"""Teacher and judge: one interface (:class:`~meteor.teacher.base.Teacher`), three backends."""
