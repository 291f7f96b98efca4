"""Two JSON endpoints: the web side of the example, which only enqueues and reads."""

from django.urls import path

from counters import views

urlpatterns = [
    path("counters/", views.counter_list, name="counter-list"),
    path("counters/<str:name>/increment/", views.counter_increment, name="counter-increment"),
]
