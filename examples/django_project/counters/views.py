"""The web side: it enqueues tasks and reads rows; the worker does the writing."""

from __future__ import annotations

from django.http import HttpRequest, JsonResponse
from django.views.decorators.csrf import csrf_exempt
from django.views.decorators.http import require_GET, require_POST

from counters.models import Counter
from counters.tasks import increment


@require_GET
def counter_list(request: HttpRequest) -> JsonResponse:
    return JsonResponse({"counters": [counter.as_dict() for counter in Counter.objects.all()]})


@csrf_exempt  # a JSON API for the example; use real authentication in a real project
@require_POST
def counter_increment(request: HttpRequest, name: str) -> JsonResponse:
    by = int(request.GET.get("by", "1"))
    result = increment.delay(name, by)
    return JsonResponse({"task_id": result.id}, status=202)
